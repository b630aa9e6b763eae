"""Kernel benchmark of block dropout around a linear layer: slicecompile against dense and dropout baselines.

--side input (default) measures dropout -> linear, slicecompile.dropout_linear: a (BM, BK) tile mask
over the input x. Providers: dense (F.linear), dropout_eager (F.dropout + F.linear), dropout_inductor
(the same under torch.compile), limit (F.linear on the kept K width: the work that must be done),
slicecompile (dropout_linear, eager), slicecompile_inductor (the same under torch.compile, where
Inductor fuses the mask drawing) and slicecompile_slice (policy="slice", eager: cuBLAS on one window
of features, whose limit is the same kept width) and slicecompile_slice_inductor (the same under
torch.compile). CSV policy: block or slice; default CSV dropout_linear.csv.

--side output measures linear -> dropout, slicecompile.linear_dropout: a (BM, BN) tile mask over the
output y. Providers: dense, dropout_eager (F.linear + F.dropout), dropout_inductor, limit (F.linear
on the kept N width), slicecompile (linear_dropout, eager) and slicecompile_inductor. CSV policy:
block-output; default CSV linear_dropout.csv.

Modes: fwd, full (forward + backward; wall time per step, which includes the host's launch overhead
when the host is slower than the GPU) and full_kernels (the summed GPU kernel time of one forward +
backward, from torch.profiler: what the step costs once launch overhead is hidden, e.g. by CUDA
graphs or a busy stream). With --rounds, each round times every provider once in turn, and each
row's ms is the median over rounds. Prints a table and appends rows to bench/results/<--csv>.

    python bench/bench_dropout_linear.py --shapes 8192,4096,4096 --p 0 0.5
    python bench/bench_dropout_linear.py --side output --shapes 8192,4096,4096 --p 0 0.5
    python bench/bench_dropout_linear.py --p 0.5 --rounds 5 --providers dropout_inductor slicecompile_inductor
"""

import functools
import math
import pathlib

import torch
import torch.nn.functional as F

import slicecompile
from slicecompile.tools.bench import CsvFile, Spread, argument_parser, interleave, run_metadata
from slicecompile.tools.timing import kernel_ms, median_ms

RESULTS = pathlib.Path(__file__).parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FIELDS = "gpu dtype M K N p policy block provider mode ms torch triton timestamp".split()


def providers(x, w, p, block):
    kept_k = max(1, math.floor((1 - p) * x.shape[1] / block[1] + 0.5)) * block[1]
    x_kept, w_kept = x[:, :kept_k].detach().requires_grad_(), w[:, :kept_k].detach().requires_grad_()
    eager = lambda: F.linear(F.dropout(x, p), w)
    return {
        "dense": (lambda: F.linear(x, w), [x, w]),
        "dropout_eager": (eager, [x, w]),
        "dropout_inductor": (torch.compile(eager), [x, w]),
        "limit": (lambda: F.linear(x_kept, w_kept), [x_kept, w_kept]),
        "slicecompile": (lambda: slicecompile.dropout_linear(x, w, p=p, block=block), [x, w]),
        "slicecompile_inductor": (torch.compile(lambda: slicecompile.dropout_linear(x, w, p=p, block=block)), [x, w]),
        "slicecompile_slice": (lambda: slicecompile.dropout_linear(x, w, p=p, policy="slice"), [x, w]),
        "slicecompile_slice_inductor": (
            torch.compile(lambda: slicecompile.dropout_linear(x, w, p=p, policy="slice")),
            [x, w],
        ),
    }


def output_providers(x, w, p, block):
    kept_n = max(1, math.floor((1 - p) * w.shape[0] / block[1] + 0.5)) * block[1]
    w_kept = w[:kept_n].detach().requires_grad_()
    eager = lambda: F.dropout(F.linear(x, w), p)
    sliced = lambda: slicecompile.linear_dropout(x, w, p=p, block=block)
    return {
        "dense": (lambda: F.linear(x, w), [x, w]),
        "dropout_eager": (eager, [x, w]),
        "dropout_inductor": (torch.compile(eager), [x, w]),
        "limit": (lambda: F.linear(x, w_kept), [x, w_kept]),
        "slicecompile": (sliced, [x, w]),
        "slicecompile_inductor": (torch.compile(sliced), [x, w]),
    }


# side: (providers function, default CSV file)
SIDES = {"input": (providers, "dropout_linear.csv"), "output": (output_providers, "linear_dropout.csv")}


def policy(side, provider):
    if side == "output":
        return "block-output"
    return "slice" if "_slice" in provider else "block"


def time_modes(fn, leaves, dy, device):
    """{mode: ms} of one provider: fwd, full and full_kernels."""
    with torch.no_grad():
        fwd = median_ms(fn, device)
        width = fn().shape[-1]
    grad = dy[:, :width].contiguous()  # the output side's limit computes only the kept columns
    step = lambda: fn().backward(grad)
    return dict(fwd=fwd, full=median_ms(step, device, grad_to_none=leaves), full_kernels=kernel_ms(step, leaves))


def run(shape, p, block, dtype, device, only=None, side="input", rounds=1):
    """{provider: {mode: Spread over rounds}}; each round times every provider once in turn."""
    torch._dynamo.reset()  # each (shape, p) compiles afresh instead of hitting the recompile limit
    M, K, N = shape
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype)
    timers = {
        name: functools.partial(time_modes, fn, leaves, dy, device)
        for name, (fn, leaves) in SIDES[side][0](x, w, p, block).items()
        if not only or name in only
    }
    return {
        name: {mode: Spread.of([times[mode] for times in runs]) for mode in runs[0]}
        for name, runs in interleave(timers, rounds).items()
    }


def main():
    parser = argument_parser(__doc__, rounds=1)
    parser.add_argument("--shapes", nargs="+", default=["8192,4096,4096"], help="M,K,N")
    parser.add_argument("--p", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--side", choices=SIDES, default="input", help="dropout on the linear's input or output")
    parser.add_argument(
        "--blocks", nargs="+", default=["128,128"], help="tile: BM,BK of the input or BM,BN of the output"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--csv", default=None, help="file under bench/results (default: by --side)")
    args = parser.parse_args()
    device = "cuda"
    meta = run_metadata(device) | dict(dtype=args.dtype)
    out = CsvFile(RESULTS / (args.csv or SIDES[args.side][1]), FIELDS, meta)
    print(f"{meta['gpu']}, {args.dtype}, torch {meta['torch']}, triton {meta['triton']}: median ms")
    print(f"{'M,K,N':>16} {'p':>5} {'block':>8} {'provider':>22} {'fwd':>14} {'full':>14} {'kernels':>14}")
    for shape in args.shapes:
        for blk in args.blocks:
            for p in args.p:
                M, K, N = map(int, shape.split(","))
                block = tuple(map(int, blk.split(",")))
                results = run((M, K, N), p, block, DTYPES[args.dtype], device, args.providers, args.side, args.rounds)
                for provider, modes in results.items():
                    size = dict(M=M, K=K, N=N, p=p, block=blk, provider=provider, policy=policy(args.side, provider))
                    out.append(*(size | dict(mode=mode, ms=f"{ms.median:.4f}") for mode, ms in modes.items()))
                    cells = "".join(
                        f" {cell(modes[mode], args.rounds):>14}" for mode in ("fwd", "full", "full_kernels")
                    )
                    print(f"{shape:>16} {p:>5} {blk:>8} {provider:>22}{cells}")


def cell(ms, rounds):
    """A table cell: the median, with its spread over rounds when there were several."""
    return str(ms) if rounds > 1 else f"{ms.median:.3f}"


if __name__ == "__main__":
    main()
