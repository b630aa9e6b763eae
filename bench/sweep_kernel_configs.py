"""Time each of dropout_linear's three GEMMs under a range of kernel tile configurations, next
to cuBLAS doing the same kept share of the work (the limit). Guides the default configs.

    python bench/sweep_kernel_configs.py --shape 8192 4096 4096 --p 0.5
"""

import argparse
import itertools

import torch
import triton
from triton.testing import do_bench

from slicecompile import draw_block_mask
from slicecompile.kernels import sparse_input_matmul, sparse_output_matmul


def configs():
    for bn, bk, warps, stages in itertools.product([128, 256], [64, 128], [4, 8], [3, 4]):
        yield dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=(8192, 4096, 4096))
    parser.add_argument("--p", type=float, default=0.5)
    args = parser.parse_args()
    M, K, N = args.shape
    block = (128, 128)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    mask = draw_block_mask(M, K, args.p, block, device="cuda")
    kept_k = int(mask.count.item()) * block[1]
    rows, counts = mask.columns()
    tiles = mask.tiles()
    dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    xk, wk = x[:, :kept_k].contiguous(), w[:, :kept_k].contiguous()
    roles = {
        "fwd": (
            lambda c: sparse_input_matmul(x, w.t(), mask.kept, mask.count, block, 2.0, config=c),
            lambda: xk @ wk.t(),
        ),
        "dx": (lambda c: sparse_output_matmul(dy, w, tiles, block, 2.0, config=c), lambda: dy @ wk),
        "dw": (
            lambda c: sparse_input_matmul(x.t(), dy, rows, counts, block[::-1], 2.0, out=dw.t(), config=c),
            lambda: dy.t() @ xk,
        ),
    }
    print(f"{torch.cuda.get_device_name()}, bf16, (M, K, N) = {(M, K, N)}, p = {args.p}, triton {triton.__version__}")
    for role, (kernel, limit) in roles.items():
        limit_ms = do_bench(limit, return_mode="median")
        results = []
        for c in configs():
            try:
                results.append((do_bench(lambda c=c, kernel=kernel: kernel(c), return_mode="median"), c))
            except Exception as e:  # configs over the shared-memory limit fail to launch
                print(f"  {role} skip {c}: {type(e).__name__}")
        results.sort(key=lambda r: r[0])
        print(f"{role}: limit (cuBLAS on the kept share) {limit_ms:.3f} ms")
        for ms, c in results[:5]:
            print(f"  {ms:.3f} ms  x{ms / limit_ms:.2f}  {c}")


if __name__ == "__main__":
    main()
