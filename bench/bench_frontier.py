"""The compute-efficacy frontier: the demo's language model (slicecompile.demo: byte-level, Python
standard-library sources) trained for the same wall-clock budget per configuration — no dropout,
F.dropout under Inductor, slicecompile block and slicecompile slice — at each p, on one GPU in
one run. Appends one row per configuration (validation loss at the end of the budget, and the
best seen) to bench/results/frontier.csv and its curve to frontier_curves.csv, and draws
frontier.png from the newest run's curves (--plot only redraws it).

    python bench/bench_frontier.py --budget 15 --p 0.05 0.15 0.3
"""

import csv
import pathlib

import torch

from slicecompile.demo import textdata
from slicecompile.demo import train as demo
from slicecompile.demo.model import Config
from slicecompile.tools.bench import CsvFile, run_metadata

RESULTS = pathlib.Path(__file__).parent / "results"
FIELDS = "gpu method p budget_s steps tokens_per_s val_loss best_val_loss layers width context batch".split()
FIELDS += "torch triton timestamp".split()
CURVE_FIELDS = "timestamp method p train_seconds step val_loss".split()
METHODS = {"no dropout": ("inductor", "-"), "F.dropout": ("inductor", "-"), "block": ("slicecompile", "block")}
METHODS["slice"] = ("slicecompile", "slice")


def main():
    cli = demo.parser()
    cli.description = __doc__.split("\n\n")[0]
    cli.set_defaults(p=[0.05, 0.15, 0.3], budget=15.0, **{k: v for k, v in demo.GPU_DEFAULTS.items() if k != "backend"})
    cli.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    cli.add_argument("--results", type=pathlib.Path, default=RESULTS, help="where frontier.csv and .png go")
    cli.add_argument("--plot", action="store_true", help="only redraw frontier.png from the CSVs")
    args = cli.parse_args()
    if args.plot:
        return plot(args.results)
    args.steps, device = 10**9, torch.device(args.device)
    meta = run_metadata(device)
    out = CsvFile(args.results / "frontier.csv", FIELDS, meta)
    curves = CsvFile(args.results / "frontier_curves.csv", CURVE_FIELDS, meta)
    config = Config(context=args.context, layers=args.layers, heads=args.heads, width=args.width)
    data = textdata.load()
    for method in args.methods:
        backend, policy = METHODS[method]
        for p in [0.0] if method == "no dropout" else args.p:
            run = demo.train(demo.Run(backend, policy, p), config, args, data, device)
            points = [
                dict(method=method, p=p, train_seconds=f"{t:.3f}", step=step, val_loss=f"{v:.4f}")
                for t, step, v in run.curve
            ]
            curves.append(*points)
            best = min(loss for _, _, loss in run.curve)
            print(f"{method:<12} p={p:<5} {run.steps:>6} steps  val {run.curve[-1][2]:.4f}  best {best:.4f}")
            out.append(
                dict(
                    method=method,
                    p=p,
                    budget_s=args.budget,
                    steps=run.steps,
                    tokens_per_s=f"{run.tokens / run.seconds:.0f}",
                    val_loss=f"{run.curve[-1][2]:.4f}",
                    best_val_loss=f"{best:.4f}",
                    layers=args.layers,
                    width=args.width,
                    context=args.context,
                    batch=args.batch,
                )
            )
    plot(args.results)


def plot(results):
    """frontier.png from the newest run in the CSVs. Left: validation loss against training
    time for each method at its best p; right: the validation loss at the end of the budget
    against p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results / "frontier.csv") as f, open(results / "frontier_curves.csv") as g:
        rows, points = list(csv.DictReader(f)), list(csv.DictReader(g))
    stamp = rows[-1]["timestamp"]
    rows = [row for row in rows if row["timestamp"] == stamp]
    points = [point for point in points if point["timestamp"] == stamp]
    fig, (curves, sweep) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method in dict.fromkeys(row["method"] for row in rows):
        finals = sorted((float(row["p"]), float(row["val_loss"])) for row in rows if row["method"] == method)
        best_p = min(finals, key=lambda final: final[1])[0]
        curve = [point for point in points if point["method"] == method and float(point["p"]) == best_p]
        seconds, losses = (
            [float(point["train_seconds"]) for point in curve],
            [float(point["val_loss"]) for point in curve],
        )
        curves.plot(seconds, losses, marker="o", markersize=3, label=f"{method}, p={best_p:g}")
        sweep.plot(*zip(*finals, strict=True), marker="o", label=method)
    budget = rows[-1]["budget_s"]
    curves.set(xlabel="training wall-clock time (s)", ylabel="validation loss (nats/byte)", title=rows[-1]["gpu"])
    sweep.set(xlabel="p", ylabel=f"validation loss after {budget} s of training", title="p swept")
    for ax in (curves, sweep):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(results / "frontier.png", dpi=120)


if __name__ == "__main__":
    main()
