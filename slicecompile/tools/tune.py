"""python -m slicecompile tune: tune the kernels for your shapes ahead of training.

Runs one forward and backward of dropout_linear for each shape, which autotunes its three GEMMs
(keyed on the sizes rounded up to powers of two, the operands' layouts, the dtype and the mask's
block) and caches each choice on disk in Triton's cache directory (TRITON_CACHE_DIR, by default
~/.triton/cache), where later processes find it instead of tuning again. Prints what was chosen.

    python -m slicecompile tune --shapes 8192,4096,4096 8192,16384,4096 --p 0.5 --dtype bfloat16
"""

import argparse

import torch

from .. import DEFAULT_BLOCK, dropout_linear
from ..kernels import autotuners

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m slicecompile tune", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", required=True, help="M,K,N of dropout -> linear: M rows, K in, N out")
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--block", type=int, nargs=2, default=DEFAULT_BLOCK, metavar=("BM", "BK"))
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("tuning needs a CUDA GPU: on a CPU the kernels run through Triton's interpreter with one config")
    shapes = []
    for text in args.shapes:
        try:
            shapes.append(tuple(int(n) for n in text.split(",")))
        except ValueError:
            parser.error(f"shapes are M,K,N, got {text!r}")
        if len(shapes[-1]) != 3:
            parser.error(f"shapes are M,K,N, got {text!r}")
    dtype = DTYPES[args.dtype]
    for M, K, N in shapes:
        x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
        w = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype).requires_grad_()
        y = dropout_linear(x, w, p=args.p, block=tuple(args.block))
        y.backward(torch.randn_like(y))
        torch.cuda.synchronize()
        print(f"tuned {M},{K},{N} p={args.p} block={tuple(args.block)} {args.dtype}")
    for name, tuner in autotuners().items():
        for key, config in tuner.cache.items():
            print(f"{name:34s} key {key}: {config}")
    return 0
