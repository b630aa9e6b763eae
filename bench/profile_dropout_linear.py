"""Where a dropout_linear training step spends its time: a torch.profiler table of GPU kernels
and host-side ops over a few forward+backward steps.

    python bench/profile_dropout_linear.py --shape 8192 4096 4096 --p 0.5
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from slicecompile import dropout_linear


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=(8192, 4096, 4096))
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    M, K, N = args.shape
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

    def step():
        dropout_linear(x, w, p=args.p).backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
