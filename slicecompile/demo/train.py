"""python -m slicecompile demo: train a small byte-level Transformer language model on Python's
own standard-library sources under each backend (and policy) asked for, and compare validation
loss against training wall-clock time: a table, a CSV of the curves and a PNG plot in --out.

    python -m slicecompile demo                                  # defaults for the device present
    python -m slicecompile demo --backend inductor slicecompile --policy block slice --p 0.1 --steps 2000

Training time excludes the first step (compilation) and the evaluations.
"""

import argparse
import csv
import pathlib
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from . import textdata
from .model import Config, LanguageModel

BACKENDS = ("eager", "inductor", "slicecompile")
POLICIES = ("block", "slice")
# A CPU run finishes in a few minutes; a GPU run is a real (small) training run.
# On a CPU both backends compile with Inductor, so the speed column compares like with like.
CPU_DEFAULTS = dict(
    layers=2, width=128, heads=4, context=64, batch=16, steps=150, eval_every=50, backend=["inductor", "slicecompile"]
)
GPU_DEFAULTS = dict(
    layers=6,
    width=384,
    heads=6,
    context=256,
    batch=64,
    steps=2000,
    eval_every=200,
    backend=["inductor", "slicecompile"],
)


@dataclass
class Run:
    """One configuration's training: curve holds (training seconds, step, validation loss)."""

    backend: str
    policy: str  # "-" for eager and inductor
    p: float
    curve: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0

    @property
    def name(self):
        return f"{self.backend}" + (f" {self.policy}" if self.policy != "-" else "") + f" p={self.p:g}"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, batches):
    model.eval()
    loss = sum(model(x, y).item() for x, y in batches) / len(batches)
    model.train()
    return loss


def train(run, config, args, data, device):
    """Train one configuration for args.steps steps or args.budget training seconds."""
    torch._dynamo.reset()  # each configuration compiles afresh (p is a guard: eight would hit the recompile limit)
    torch.manual_seed(args.seed)
    model = LanguageModel(replace(config, p=run.p)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    options = None
    if run.backend == "slicecompile":  # at p = 0 there is nothing to rewrite and no policy
        options = {"min_gemm_size": 0} | ({"policy": run.policy} if run.policy != "-" else {})
    step_model = model if run.backend == "eager" else torch.compile(model, backend=run.backend, options=options)
    rng = torch.Generator().manual_seed(args.seed)
    val_rng = torch.Generator().manual_seed(12345)
    val_batches = [
        textdata.batch(data[1], args.batch, config.context, val_rng, device) for _ in range(args.eval_batches)
    ]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    limit = args.budget if args.budget else float("inf")
    bar = tqdm(total=None if args.budget else args.steps, desc=run.name, unit="step", leave=False, mininterval=0.5)
    while run.steps < args.steps and run.seconds < limit:
        x, y = textdata.batch(data[0], args.batch, config.context, rng, device)
        _sync(device)
        start = time.perf_counter()
        with autocast:
            loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if run.steps > 0:  # the first step compiles
            run.seconds += time.perf_counter() - start
            run.tokens += x.numel()
        run.steps += 1
        if run.steps % args.eval_every == 0:  # the eager model: no second compilation for eval mode
            with autocast:
                run.curve.append((run.seconds, run.steps, evaluate(model, val_batches)))
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{run.tokens / max(run.seconds, 1e-9):.0f}")
    bar.close()
    if not run.curve or run.curve[-1][1] != run.steps:
        with autocast:
            run.curve.append((run.seconds, run.steps, evaluate(model, val_batches)))
    return run


def runs_asked(args):
    """Every (backend, policy, p) configuration the flags name; p = 0 runs once per backend."""
    runs = []
    for backend in args.backend:
        for p in args.p:
            policies = args.policy if backend == "slicecompile" and p > 0 else ["-"]
            runs += [Run(backend, policy, p) for policy in policies]
    return runs


def write_results(runs, out):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "demo.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["backend", "policy", "p", "train_seconds", "step", "val_loss"])
        for run in runs:
            writer.writerows(
                [run.backend, run.policy, run.p, f"{s:.3f}", step, f"{loss:.4f}"] for s, step, loss in run.curve
            )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ax.plot(
            [s for s, _, _ in run.curve], [loss for _, _, loss in run.curve], marker="o", markersize=3, label=run.name
        )
    ax.set_xlabel("training wall-clock time (s)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("byte-level LM on Python standard-library sources")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=120)
    plt.close(fig)


def table(runs):
    lines = [f"{'configuration':<28}{'steps':>7}{'train s':>9}{'tokens/s':>11}{'val loss':>10}{'best':>8}"]
    for run in runs:
        best = min(loss for _, _, loss in run.curve)
        rate = run.tokens / run.seconds if run.seconds else 0.0
        lines.append(
            f"{run.name:<28}{run.steps:>7}{run.seconds:>9.1f}{rate:>11.0f}{run.curve[-1][2]:>10.4f}{best:>8.4f}"
        )
    return "\n".join(lines)


def parser():
    cli = argparse.ArgumentParser(prog="python -m slicecompile demo", description=__doc__.split("\n\n")[0])
    cli.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_argument("--backend", nargs="+", choices=BACKENDS, help="several compare (default: by device)")
    cli.add_argument("--policy", nargs="+", choices=POLICIES, default=["block"], help="slicecompile's policies")
    cli.add_argument("--p", type=float, nargs="+", default=[0.1], help="dropout probabilities (0: no dropout)")
    cli.add_argument("--steps", type=int, help="training steps per configuration (default: by device)")
    cli.add_argument("--budget", type=float, help="training seconds per configuration instead of a step count")
    for name in ("layers", "width", "heads", "context", "batch", "eval_every"):
        cli.add_argument(f"--{name.replace('_', '-')}", type=int, help="default: by device")
    cli.add_argument("--eval-batches", type=int, default=8)
    cli.add_argument("--lr", type=float, default=1e-3)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo_out"))
    return cli


def main(argv=None):
    compare(parser().parse_args(argv))
    return 0


def compare(args):
    """Train every configuration args asks for; write the CSV and plot; print the table."""
    device = torch.device(args.device)
    if args.budget and args.steps is None:
        args.steps = 10**9  # the budget ends each run
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for p in args.p:
        if not 0 <= p < 1:
            raise SystemExit(f"--p must be in [0, 1), got {p}")
    config = Config(context=args.context, layers=args.layers, heads=args.heads, width=args.width)
    data = textdata.load()
    print(
        f"{device}: {args.layers} layers, width {args.width}, context {args.context}, batch {args.batch}; "
        f"{len(data[0]):,} training and {len(data[1]):,} validation bytes of {len(textdata.FILES)} stdlib files"
    )
    runs = [train(run, config, args, data, device) for run in runs_asked(args)]
    write_results(runs, args.out)
    print(table(runs))
    if device.type == "cpu":
        print(
            "On a CPU slicecompile's ops run their dense references (no tile skipping): this run shows "
            "block dropout's effect as a regulariser, not the kernels' speed."
        )
    print(f"curves: {args.out / 'demo.csv'}, plot: {args.out / 'val_loss.png'}")
    return runs
