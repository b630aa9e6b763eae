"""Every autotuning candidate of the attention kernels, launched explicitly on each read path
(pointer, TMA) and checked against the float64 reference: which compile, which are right.

    python bench/probe_attention_configs.py [--length 1024] [--heads 4]
"""

import argparse
import itertools

import torch

from slicecompile import draw_attention_mask, dropout_attention_reference
from slicecompile.kernels import attention_backward, attention_forward
from slicecompile.kernels.attention_backward import GRAD_KV, GRAD_Q
from slicecompile.kernels.attention_forward import FORWARD


def probe(E, dtype, causal, tma, kernel_index, config, length, heads, device):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, E, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = draw_attention_mask(1, heads, length, length, 0.3, (128, 128), device=device)
    configs = [None, None, None]
    configs[kernel_index] = config
    common = (mask.tiles, mask.block, mask.scale, E**-0.5)
    out, lse = attention_forward(q.detach(), k.detach(), v.detach(), *common, None, causal, config=configs[0], tma=tma)
    grad = torch.randn_like(out)
    dq, dk, dv, _ = attention_backward(grad, q.detach(), k.detach(), v.detach(), out, lse, *common, None, causal,
                                       configs=configs[1:], tma=tma)  # fmt: skip
    ref = dropout_attention_reference(*(t.double() for t in (q, k, v)), mask, is_causal=causal)
    ref.backward(grad.double())
    errors = [(a.double() - b).norm() / b.norm() for a, b in zip((out, dq, dk, dv), (ref, q.grad, k.grad, v.grad))]
    return max(e.item() for e in errors)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    kernels = [("forward", FORWARD), ("dk_dv", GRAD_KV), ("dq", GRAD_Q)]
    for E, dtype, tma, causal in itertools.product((64, 128), (torch.bfloat16,), (False, True), (False, True)):
        for index, (name, kernel) in enumerate(kernels):
            for c in kernel.candidates(2, E, E, (128, 128)):
                config = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                try:
                    err = probe(E, dtype, causal, tma, index, config, args.length, args.heads, args.device)
                    verdict = "ok" if err < 2e-2 else "WRONG"
                    result = f"{err:.2e}"
                except Exception as e:  # a compiler failure is a result here
                    verdict, result = "FAILED", f"{type(e).__name__}: {str(e).splitlines()[-1][:120]}"
                tiles = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                path = "tma" if tma else "ptr"
                print(f"E={E} {path} causal={int(causal)} {name:8} {tiles:16} {verdict:6} {result}", flush=True)


if __name__ == "__main__":
    main()
