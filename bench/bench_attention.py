"""Attention with dropout: slicecompile's block-dropout attention against SDPA and Inductor.

Providers: sdpa (F.scaled_dot_product_attention without dropout: the target at p = 0.1),
sdpa_dropout (the same with dropout_p = p: FlashAttention-class dropout, a random number per
element), eager_inductor (softmax(q kᵀ · scale) → F.dropout → @ v under torch.compile, which
fuses the dropout into the softmax but writes the L×L probabilities), slicecompile
(slicecompile.dropout_attention, eager), slicecompile_inductor (the same under torch.compile) and
slicecompile_sdpa (SDPA with dropout_p = p under backend="slicecompile"; until the backend
rewrites SDPA sites, that is SDPA compiled by Inductor).

Modes: fwd, bwd (backward alone, the graph kept), full (forward + backward, wall time) and
full_kernels (the summed GPU kernel time of one forward + backward, from torch.profiler). Prints
a table and appends rows to bench/results/<--csv>.

    python bench/bench_attention.py --shapes 8,12,1024,64 4,16,2048,128 16,12,512,64 --p 0.1 0.5 --causal 0 1
"""

import argparse
import csv
import datetime
import math
import os
import pathlib

import torch
import torch.nn.functional as F
import triton

import slicecompile
from slicecompile.tools.timing import kernel_ms, median_ms

RESULTS = pathlib.Path(__file__).parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FIELDS = "gpu dtype B H L E causal p block provider mode ms torch triton timestamp".split()


def eager_attention(q, k, v, p, causal):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        length = q.shape[-2]
        keep = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return F.dropout(scores.softmax(dim=-1), p) @ v


def providers(q, k, v, p, causal, block):
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
    ours = lambda: slicecompile.dropout_attention(q, k, v, dropout_p=p, is_causal=causal, block=block)
    options = {"block": block, "min_gemm_size": 0}
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "sdpa_dropout": sdpa,
        "eager_inductor": torch.compile(lambda: eager_attention(q, k, v, p, causal)),
        "slicecompile": ours,
        "slicecompile_inductor": torch.compile(ours),
        "slicecompile_sdpa": torch.compile(sdpa, backend="slicecompile", options=options),
    }


def run(shape, p, causal, block, dtype, only=None):
    torch._dynamo.reset()  # each configuration compiles afresh instead of hitting the recompile limit
    B, H, L, E = shape
    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, L, E, device="cuda", dtype=dtype)
    leaves, rows = [q, k, v], []
    for name, fn in providers(q, k, v, p, causal, block).items():
        if only and name not in only:
            continue
        with torch.no_grad():
            fwd = median_ms(fn, "cuda")
        out = fn()
        bwd = median_ms(lambda out=out: out.backward(grad, retain_graph=True), "cuda", grad_to_none=leaves)
        step = lambda fn=fn: fn().backward(grad)
        full = median_ms(step, "cuda", grad_to_none=leaves)
        rows += [(name, "fwd", fwd), (name, "bwd", bwd), (name, "full", full)]
        rows.append((name, "full_kernels", kernel_ms(step, leaves)))
        del out
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["8,12,1024,64", "4,16,2048,128", "16,12,512,64"])
    parser.add_argument("--p", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    parser.add_argument("--block", default="128,128", help="BM,BN: the dropped tile of each (query, key) plane")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--csv", default="attention.csv", help="file under bench/results")
    args = parser.parse_args()
    block = tuple(map(int, args.block.split(",")))
    meta = dict(
        gpu=torch.cuda.get_device_name(),
        dtype=args.dtype,
        torch=torch.__version__,
        triton=triton.__version__,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    out = RESULTS / args.csv
    os.makedirs(RESULTS, exist_ok=True)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        print(f"{meta['gpu']}, {args.dtype}, torch {meta['torch']}, triton {meta['triton']}: median ms")
        print(
            f"{'B,H,L,E':>16} {'causal':>6} {'p':>5} {'provider':>22} {'fwd':>8} {'bwd':>8} {'full':>8} {'kernels':>8}"
        )
        for shape in args.shapes:
            for causal in map(bool, args.causal):
                for p in args.p:
                    dims = tuple(map(int, shape.split(",")))
                    rows = run(dims, p, causal, block, DTYPES[args.dtype], args.providers)
                    by_provider = {}
                    for provider, mode, ms in rows:
                        by_provider.setdefault(provider, {})[mode] = ms
                        sizes = dict(zip("BHLE", dims, strict=True))
                        writer.writerow(
                            meta
                            | sizes
                            | dict(causal=int(causal), p=p, block=args.block, provider=provider, mode=mode)
                            | dict(ms=f"{ms:.4f}")
                        )
                    for provider, ms in by_provider.items():
                        print(
                            f"{shape:>16} {int(causal):>6} {p:>5} {provider:>22} {ms['fwd']:>8.3f} {ms['bwd']:>8.3f}"
                            f" {ms['full']:>8.3f} {ms['full_kernels']:>8.3f}"
                        )
                    f.flush()


if __name__ == "__main__":
    main()
