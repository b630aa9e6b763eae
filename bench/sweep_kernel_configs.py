"""Time each of dropout_linear's three GEMMs under a range of kernel variants and tile
configurations, next to cuBLAS doing the same kept share of the work (the limit), and next to
the same kernel on an already-compacted input (its own dense speed). Guides the autotuning
candidates beside each kernel.

    python bench/sweep_kernel_configs.py --shape 8192 4096 4096 --p 0.5 --csv bench/results/kernel_configs.csv
"""

import functools
import itertools

import torch
from triton.testing import do_bench

from slicecompile import draw_block_mask
from slicecompile.kernels import sparse_input_matmul, sparse_output_matmul
from slicecompile.tools.bench import CsvFile, argument_parser, run_metadata

VARIANTS = {  # name: (tma, persistent)
    "pointer": (False, False),
    "tma": (True, False),
    "tma_persistent": (True, True),
}


CONFIG_FIELDS = ["BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"]
# WARP_SPECIALIZE: earlier sweeps tried Triton's warp specialisation; this one never does.
FIELDS = ["gpu", "dtype", "M", "K", "N", "p", "role", "variant", "ms", "dense_ms", "limit_ms", *CONFIG_FIELDS]
FIELDS += ["WARP_SPECIALIZE", "torch", "triton", "timestamp"]


def configs(role, variant):
    block_n = [128] if role == "dx" else [128, 256]  # dX's tiles are output tiles: at most the mask's block
    grid = itertools.product(block_n, [64], [4, 8], [3, 4, 5])
    if variant == "pointer":
        grid = [(128, 64, 8, 3), (128, 64, 4, 4), (256, 64, 8, 3)]
    extra = [(128, 128, 8, 3), (128, 128, 4, 4)]
    for bn, bk, warps, stages in [*grid, *extra]:
        yield dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=(8192, 4096, 4096))
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--roles", nargs="+", default=["fwd", "dx", "dw"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--csv", default=None, help="append every timing to this CSV")
    args = parser.parse_args()
    meta = run_metadata() | dict(dtype=args.dtype)
    out = CsvFile(args.csv, FIELDS, meta) if args.csv else None
    M, K, N = args.shape
    dtype = getattr(torch, args.dtype)
    block = (128, 128)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    mask = draw_block_mask(M, K, args.p, block, device="cuda")
    kept_k = int(mask.count.item()) * block[1]
    rows, counts = mask.columns()
    tiles = mask.tiles()
    dw = torch.empty(N, K, device="cuda", dtype=dtype)
    xk, wk = x[:, :kept_k].contiguous(), w[:, :kept_k].contiguous()
    dense = draw_block_mask(M, kept_k, 0.0, block, device="cuda")  # every tile of the compacted input
    dense_rows, dense_counts = dense.columns()
    dwk = torch.empty(N, kept_k, device="cuda", dtype=dtype)
    roles = {  # role: (kernel on the sparse input, the same kernel on the compacted input, cuBLAS on it)
        "fwd": (
            lambda c, t: sparse_input_matmul(x, w.t(), mask.kept, mask.count, block, 2.0, config=c, tma=t),
            lambda c, t: sparse_input_matmul(xk, wk.t(), dense.kept, dense.count, block, 2.0, config=c, tma=t),
            lambda: xk @ wk.t(),
        ),
        "dx": (
            lambda c, t: sparse_output_matmul(dy, w, tiles, block, 2.0, config=c, tma=t),
            lambda c, t: sparse_output_matmul(dy, wk, dense.tiles(), block, 2.0, config=c, tma=t),
            lambda: dy @ wk,
        ),
        "dw": (
            lambda c, t: sparse_input_matmul(x.t(), dy, rows, counts, block[::-1], 2.0, out=dw.t(), config=c, tma=t),
            lambda c, t: sparse_input_matmul(
                xk.t(), dy, dense_rows, dense_counts, block[::-1], 2.0, out=dwk.t(), config=c, tma=t
            ),
            lambda: dy.t() @ xk,
        ),
    }
    versions = f"torch {meta['torch']}, triton {meta['triton']}"
    print(f"{meta['gpu']}, {args.dtype}, (M, K, N) = {(M, K, N)}, p = {args.p}, {versions}")
    rows_out = []
    summary = []
    for role in args.roles:
        kernel, compact, limit = roles[role]
        limit_ms = do_bench(limit, return_mode="median")
        for variant in args.variants:
            tma, persistent = VARIANTS[variant]
            results = []
            for c in configs(role, variant):
                launch = dict(c, PERSISTENT=persistent)
                try:
                    ms = do_bench(functools.partial(kernel, launch, tma), return_mode="median")
                    dense_ms = do_bench(functools.partial(compact, launch, tma), return_mode="median")
                except Exception as e:  # configs over the shared-memory limit fail to compile or launch
                    print(f"  {role} {variant} skip {c}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                results.append((ms, dense_ms, c))
                rows_out.append(dict(role=role, variant=variant, ms=ms, dense_ms=dense_ms, limit_ms=limit_ms, **c))
            results.sort(key=lambda r: r[0])
            print(f"{role} {variant}: limit (cuBLAS on the kept share) {limit_ms:.3f} ms")
            for ms, dense_ms, c in results[:4]:
                print(f"  {ms:.3f} ms  x{ms / limit_ms:.2f}  (compacted {dense_ms:.3f})  {c}")
            if results:
                summary.append((role, variant, results[0][0], limit_ms, results[0][2]))
    print("\nbest per role and variant")
    for role, variant, ms, limit_ms, c in summary:
        print(f"{role:4s} {variant:15s} {ms:.3f} ms  limit {limit_ms:.3f}  x{ms / limit_ms:.2f}  {c}")
    if out:
        out.append(*(dict(M=M, K=K, N=N, p=args.p, **r, WARP_SPECIALIZE=False) for r in rows_out))


if __name__ == "__main__":
    main()
