"""python -m slicecompile demo: train a small Transformer language model on Python's own
standard-library sources under each backend (and policy) asked for, and compare validation loss
against training wall-clock time: a table, a CSV of the curves and a PNG plot in --out.

    python -m slicecompile demo                                  # defaults for the device present
    python -m slicecompile demo --backend inductor slicecompile --policy block slice --p 0.1 --steps 2000
    python -m slicecompile demo --vocab bpe --corpus stdlib --hashed 0.1 0.05   # full against hashed outputs

The text is ten standard-library modules, or with --corpus stdlib the whole standard library
(textdata.py). The vocabulary is the 256 byte values, or with --vocab bpe a byte-level BPE
vocabulary of at most --vocab-size tokens (bpe.py; needs the `tokenizers` package). --hashed adds,
for each active share, runs that train through the slicecompile backend with
options={"hashed_outputs": active}: the loss over about that share of the output tiles.
Validation loss is always the full softmax (the eager model in eval mode, without gradients), so
hashed and full training compare on one measure.

Training time excludes the first step (compilation) and the evaluations.
"""

import argparse
import csv
import pathlib
import time
from dataclasses import dataclass, field, replace

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm

from .. import explain
from . import bpe, textdata
from .model import Config, LanguageModel

BACKENDS = ("eager", "inductor", "slicecompile")
POLICIES = ("block", "slice")
VOCABS = ("bytes", "bpe")
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
    hashed: float | None = None  # the active share of hashed-output training; None: the full loss
    curve: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0

    @property
    def objective(self):
        return f"hashed@{self.hashed:g}" if self.hashed else "full"

    @property
    def name(self):
        name = f"{self.backend}" + (f" {self.policy}" if self.policy != "-" else "") + f" p={self.p:g}"
        return name + (f" {self.objective}" if self.hashed else "")

    @property
    def options(self):
        """The backend's options: at p = 0 there is nothing to rewrite and no policy."""
        if self.backend != "slicecompile":
            return None
        options = {"min_gemm_size": 0} | ({"policy": self.policy} if self.policy != "-" else {})
        return options | ({"hashed_outputs": self.hashed} if self.hashed else {})


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, batches):
    """Mean loss of the eager model in eval mode without gradients: the full softmax, whatever the
    compiled training step computes."""
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
    step_model = model if run.backend == "eager" else torch.compile(model, backend=run.backend, options=run.options)
    hashed_before = counters["slicecompile"]["rewritten_hashed_outputs"]
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
        elif run.hashed and counters["slicecompile"]["rewritten_hashed_outputs"] == hashed_before:
            raise RuntimeError(f"{run.name}: the compiled step kept the full loss (TORCH_LOGS=+slicecompile says why)")
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
    """Every (backend, policy, p) configuration the flags name; p = 0 runs once per backend. Then,
    per --hashed share, slicecompile's (policy, p) configurations trained on hashed outputs."""
    runs = []
    for backend in args.backend:
        for p in args.p:
            policies = args.policy if backend == "slicecompile" and p > 0 else ["-"]
            runs += [Run(backend, policy, p) for policy in policies]
    for active in args.hashed or ():
        for p in args.p:
            runs += [Run("slicecompile", policy, p, active) for policy in (args.policy if p > 0 else ["-"])]
    return runs


def check_hashed_sites(runs, config, data, device):
    """SystemExit before any training where the backend would leave a --hashed run's loss dense
    (slicecompile.explain's reason: e.g. too few output tiles for the share to pay)."""
    x, y = textdata.batch(data[0], 2, config.context, torch.Generator().manual_seed(0), device)
    for run in (run for run in runs if run.hashed):
        model = LanguageModel(replace(config, p=run.p)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            report = explain(model, x, y, options=run.options)
        losses = [site for site in report.sites if site.side == "loss"]
        if not any(site.rewritten for site in losses):
            reasons = "; ".join(site.reason for site in losses) or "no cross-entropy site found"
            raise SystemExit(f"--hashed {run.hashed:g}: the backend would not rewrite the model's loss: {reasons}")


def write_results(runs, out, vocab="bytes", corpus="modules"):
    """demo.csv and val_loss.png in out; vocab names the tokens ("bytes", "bpe-10475"), corpus the
    text (textdata.CORPORA)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "demo.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["backend", "policy", "p", "train_seconds", "step", "val_loss", "objective", "vocab", "corpus"])
        for run in runs:
            writer.writerows(
                [run.backend, run.policy, run.p, f"{s:.3f}", step, f"{loss:.4f}", run.objective, vocab, corpus]
                for s, step, loss in run.curve
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
    ax.set_ylabel("validation loss (nats/byte)" if vocab == "bytes" else f"validation loss (nats/token, {vocab})")
    text = "ten standard-library modules" if corpus == "modules" else "the Python standard library"
    ax.set_title(f"{'byte-level' if vocab == 'bytes' else 'BPE'} LM on {text}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=120)
    plt.close(fig)


def table(runs):
    width = max([28] + [len(run.name) + 2 for run in runs])
    lines = [f"{'configuration':<{width}}{'steps':>7}{'train s':>9}{'tokens/s':>11}{'val loss':>10}{'best':>8}"]
    for run in runs:
        best = min(loss for _, _, loss in run.curve)
        rate = run.tokens / run.seconds if run.seconds else 0.0
        lines.append(
            f"{run.name:<{width}}{run.steps:>7}{run.seconds:>9.1f}{rate:>11.0f}{run.curve[-1][2]:>10.4f}{best:>8.4f}"
        )
    return "\n".join(lines)


def parser():
    cli = argparse.ArgumentParser(prog="python -m slicecompile demo", description=__doc__.split("\n\n")[0])
    cli.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_argument("--backend", nargs="+", choices=BACKENDS, help="several compare (default: by device)")
    cli.add_argument("--policy", nargs="+", choices=POLICIES, default=["block"], help="slicecompile's policies")
    cli.add_argument("--p", type=float, nargs="+", default=[0.1], help="dropout probabilities (0: no dropout)")
    cli.add_argument(
        "--corpus", choices=textdata.CORPORA, default="modules", help="ten stdlib modules, or the whole stdlib"
    )
    cli.add_argument("--vocab", choices=VOCABS, default="bytes", help="byte values, or byte-level BPE (bpe.py)")
    cli.add_argument("--vocab-size", type=int, help=f"--vocab bpe's size at most (default {bpe.DEFAULT_VOCAB_SIZE})")
    cli.add_argument("--hashed", type=float, nargs="+", help="active shares: also train on hashed outputs")
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


def check_args(args):
    """SystemExit naming the flag and value that cannot be used."""
    for p in args.p:
        if not 0 <= p < 1:
            raise SystemExit(f"--p must be in [0, 1), got {p}")
    for active in args.hashed or ():
        if not 0 < active <= 1:
            raise SystemExit(f"--hashed takes active shares in (0, 1], got {active}")
    if args.vocab_size is not None:
        if args.vocab != "bpe":
            raise SystemExit("--vocab-size sets the BPE vocabulary: add --vocab bpe")
        try:
            bpe.check_vocab_size(args.vocab_size)
        except ValueError as error:
            raise SystemExit(f"--vocab-size: {error}") from None


def load_data(args, files):
    """(train, validation) token tensors of files and the vocabulary size; a BPE tokenizer is
    trained (or loaded from its cache) on the training text."""
    data = textdata.load(files)
    if args.vocab == "bytes":
        return data, textdata.VOCAB
    size = args.vocab_size or bpe.DEFAULT_VOCAB_SIZE
    data, tokenizer = bpe.load(size, data)
    vocab = tokenizer.get_vocab_size()
    if vocab < size:
        print(f"byte-level BPE: {vocab:,} tokens; the corpus's merges ran out before the {size:,} asked for")
    return data, vocab


def compare(args):
    """Train every configuration args asks for; write the CSV and plot; print the table."""
    device = torch.device(args.device)
    if args.budget and args.steps is None:
        args.steps = 10**9  # the budget ends each run
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_args(args)
    files = textdata.corpus_files(args.corpus)
    data, vocab = load_data(args, files)
    config = Config(vocab=vocab, context=args.context, layers=args.layers, heads=args.heads, width=args.width)
    print(
        f"{device}: {args.layers} layers, width {args.width}, context {args.context}, batch {args.batch}; "
        f"{len(data[0]):,} training and {len(data[1]):,} validation {'bytes' if args.vocab == 'bytes' else 'tokens'} "
        f"of corpus {args.corpus} ({len(files)} stdlib files)"
    )
    runs = runs_asked(args)
    check_hashed_sites(runs, config, data, device)
    runs = [train(run, config, args, data, device) for run in runs]
    write_results(runs, args.out, "bytes" if args.vocab == "bytes" else f"bpe-{vocab}", args.corpus)
    print(table(runs))
    if device.type == "cpu":
        print(
            "On a CPU slicecompile's ops run their dense references (no tile skipping): this run shows "
            "block dropout's effect as a regulariser, not the kernels' speed."
            + (" The hashed loss does compute only its active tiles (gathered weight rows)." if args.hashed else "")
        )
    print(f"curves: {args.out / 'demo.csv'}, plot: {args.out / 'val_loss.png'}")
    return runs
