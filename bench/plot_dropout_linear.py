"""Plot bench_dropout_linear.py's CSV: time against p for each shape, one line per provider,
from the newest run of each (gpu, dtype, shape, p, provider, mode).

    python bench/plot_dropout_linear.py --dtype bfloat16 --mode full_kernels
"""

import argparse
import csv
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def newest(rows):
    latest = {}
    for r in rows:
        key = (r["gpu"], r["dtype"], r["M"], r["K"], r["N"], r["p"], r["block"], r["provider"], r["mode"])
        if key not in latest or r["timestamp"] > latest[key]["timestamp"]:
            latest[key] = r
    return latest.values()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=str(RESULTS / "dropout_linear.csv"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mode", default="full_kernels", help="fwd, full or full_kernels")
    parser.add_argument("--block", default="128,128")
    parser.add_argument("--out", default=None, help="PNG (default: results/dropout_linear_<dtype>_<mode>.png)")
    args = parser.parse_args()
    rows = [
        r
        for r in newest(csv.DictReader(open(args.csv)))
        if r["dtype"] == args.dtype and r["mode"] == args.mode and r["block"] == args.block
    ]
    shapes = sorted({(int(r["M"]), int(r["K"]), int(r["N"])) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
    for ax, (M, K, N) in zip(axes[0], shapes):
        here = [r for r in rows if (int(r["M"]), int(r["K"]), int(r["N"])) == (M, K, N)]
        for provider in sorted({r["provider"] for r in here}):
            points = sorted((float(r["p"]), float(r["ms"])) for r in here if r["provider"] == provider)
            ax.plot(*zip(*points), marker="o", label=provider)
        ax.set_title(f"(M, K, N) = ({M}, {K}, {N})", fontsize=9)
        ax.set_xlabel("p")
        ax.set_ylabel(f"{args.mode} ms")
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    gpu = rows[0]["gpu"] if rows else "?"
    fig.suptitle(f"dropout -> linear, {gpu}, {args.dtype}, block {args.block}: median {args.mode} ms", fontsize=10)
    fig.tight_layout()
    out = args.out or RESULTS / f"dropout_linear_{args.dtype}_{args.mode}.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
