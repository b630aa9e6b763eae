"""What rewrite="auto" decides at the shapes of the benchmarks and of common models: for each
workload, our op's forward+backward time against the dense computation Inductor runs for it
(F.linear, F.conv2d or F.scaled_dot_product_attention with the same dropout_p), timed as the
backend times a site at compile time, and the verdict. Appends rows to bench/results/verdicts.csv.

    python bench/bench_verdicts.py
"""

import pathlib

from slicecompile.compiler.verdicts import MARGIN, Workload, time_workload
from slicecompile.tools.bench import CsvFile, argument_parser, run_metadata

RESULTS = pathlib.Path(__file__).parent / "results"
FIELDS = "gpu kind shapes dtype p settings ours_ms inductor_ms ratio rewritten torch triton timestamp".split()

# (M, K, N): bench_dropout_linear's shapes, then GPT-2 small's and the encoder's layers at 8192 tokens
LINEAR = [(8192, 4096, 4096), (8192, 16384, 4096), (16384, 4096, 16384), (4096, 1024, 4096)]
LINEAR += [(8192, 768, 3072), (8192, 3072, 768), (8192, 768, 768), (8192, 1024, 4096), (8192, 4096, 1024)]
# (planes, queries, keys, head dim, value dim, masked): GPT-2 small at 8 x 1024, a 2048-token model
ATTENTION = [(96, 1024, 1024, 64, 64, False), (64, 2048, 2048, 128, 128, False)]
# WRN-28-10's widest block: 128 images of 640 channels at 8 x 8, 3 x 3 kernels
CONV = [((128, 640, 8, 8), (640, 640, 3, 3), False)]


def workloads(ps, block):
    for p in ps:
        for kind in ("linear", "output", "slice"):
            for m, k, n in LINEAR:
                yield Workload(kind, ((m, k, n, True),), "bfloat16", p, (block,))
        for shapes in ATTENTION:
            for causal in (False, True):
                yield Workload("attention", shapes, "bfloat16", p, (block, causal))
        for shapes in CONV:
            yield Workload("conv", shapes, "bfloat16", p, ("block", 8, (1, 1), (1, 1), (1, 1)))


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--p", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--block", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--csv", type=pathlib.Path, default=RESULTS / "verdicts.csv")
    args = parser.parse_args()
    out = CsvFile(args.csv, FIELDS, run_metadata())
    print(f"{'kind':10s} {'shapes':44s} {'p':>5s} {'ours ms':>8s} {'dense ms':>8s} {'ratio':>6s}  verdict")
    for work in workloads(args.p, tuple(args.block)):
        try:
            ours, dense = time_workload(work)
        except Exception as error:  # a kernel failing at a shape is a result too
            print(f"{work.kind:10s} {str(work.shapes):44s} {work.p:5g} failed: {type(error).__name__}: {error}")
            continue
        rewritten = ours <= MARGIN * dense
        print(f"{work.kind:10s} {str(work.shapes):44s} {work.p:5g} {ours:8.3f} {dense:8.3f} {dense / ours:6.2f}  "
              f"{'rewrite' if rewritten else 'Inductor'}")  # fmt: skip
        row = {"kind": work.kind, "shapes": work.shapes, "dtype": work.dtype, "p": work.p}
        row |= {"settings": work.settings, "ours_ms": f"{ours:.4f}", "inductor_ms": f"{dense:.4f}"}
        out.append(row | {"ratio": f"{dense / ours:.3f}", "rewritten": rewritten})


if __name__ == "__main__":
    main()
