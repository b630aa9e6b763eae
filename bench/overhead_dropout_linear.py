"""Host-side cost of each piece of a dropout_linear step, measured on a tiny problem so that
the GPU never waits on itself: microseconds of wall time per call, after warm-up.

    python bench/overhead_dropout_linear.py
"""

import cProfile
import pstats

import torch
import torch.nn.functional as F

from slicecompile import draw_block_mask, dropout_linear
from slicecompile.kernels import sparse_input_matmul, sparse_output_matmul
from slicecompile.tools.bench import device_name
from slicecompile.tools.timing import mean_call_ms


def per_call_us(fn, calls=200):
    return mean_call_ms(fn, calls) * 1000


def main():
    M = K = N = 256
    block = (128, 128)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    mask = draw_block_mask(M, K, 0.5, block, device="cuda")
    tiles = mask.tiles()
    xd, wd = x.detach(), w.detach()
    pieces = {
        "F.linear fwd": lambda: F.linear(xd, wd),
        "F.linear fwd+bwd": lambda: F.linear(x, w).backward(dy),
        "F.dropout+F.linear fwd+bwd": lambda: F.linear(F.dropout(x, 0.5), w).backward(dy),
        "draw_block_mask": lambda: draw_block_mask(M, K, 0.5, block, device="cuda"),
        "mask.tiles()": mask.tiles,
        "mask.columns()": mask.columns,
        "sparse_input_matmul launch": lambda: sparse_input_matmul(xd, wd.t(), mask.kept, mask.count, block, 2.0),
        "sparse_output_matmul launch": lambda: sparse_output_matmul(dy, wd, tiles, block, 2.0),
        "custom op fwd (no grad)": lambda: torch.ops.slicecompile.block_dropout_linear(
            xd, wd, None, mask.kept, mask.count, 128, 128, 0.5
        ),
        "dropout_linear fwd (no grad)": lambda: dropout_linear(xd, wd, p=0.5),
        "dropout_linear fwd+bwd": lambda: dropout_linear(x, w, p=0.5).backward(dy),
    }
    print(f"{device_name()}: host microseconds per call at {M}x{K}x{N}")
    for name, fn in pieces.items():
        print(f"{name:<32}{per_call_us(fn):>9.1f}")
    profile = cProfile.Profile()
    profile.runcall(per_call_us, pieces["dropout_linear fwd+bwd"])
    pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
