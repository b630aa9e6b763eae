"""Training step of Wide ResNet-28-10-style blocks (BN → ReLU → conv3x3 → BN → ReLU → dropout →
conv3x3, plus the identity shortcut; by default the last stage: 4 blocks of 640 channels at 8x8,
batch 128, bf16 autocast, SGD with momentum 0.9, lr 0.01) under eager, backend="inductor" and
backend="slicecompile" with the block and the slice policy. Reports the median step time (CUDA
events; with --rounds, the variants take turns), the summed GPU kernel time of a step
(torch.profiler) and the loss over the run, and appends rows to bench/results/wrn_block.csv.

    python bench/bench_wrn_block.py --p 0.3 0.5
    python bench/bench_wrn_block.py --p 0.5 --steps 30 --rounds 5 --variants inductor "slicecompile block"
"""

import pathlib

import torch
import torch.nn as nn

import slicecompile
from slicecompile.tools.bench import CsvFile, argument_parser, interleaved_steps, run_metadata, training_step

RESULTS = pathlib.Path(__file__).parent / "results"
FIELDS = "gpu variant mode samples_per_group p blocks channels size batch step_ms kernel_ms".split()
FIELDS += "loss_first loss_last torch triton timestamp".split()
VARIANTS = {
    "eager": (None, None),
    "inductor": ("inductor", None),
    "slicecompile block": ("slicecompile", {"policy": "block"}),
    "slicecompile slice": ("slicecompile", {"policy": "slice"}),
}


class WideBlock(nn.Module):
    def __init__(self, channels, p):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        hidden = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(self.drop(torch.relu(self.bn2(hidden))))


class Stage(nn.Module):
    def __init__(self, blocks, channels, p, classes=100):
        super().__init__()
        self.blocks = nn.Sequential(*(WideBlock(channels, p) for _ in range(blocks)))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean(dim=(2, 3)))


def trainer(variant, p, args):
    """A training step of a fresh stage under variant: step(x, y) -> loss."""
    torch.manual_seed(0)
    model = Stage(args.blocks, args.channels, p).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    backend, options = VARIANTS[variant]
    if backend == "slicecompile":
        options = {**options, "samples_per_group": args.samples_per_group}
    if args.cudagraphs:  # mode="reduce-overhead", which torch.compile does not take together with options=
        options = {**(options or {}), "triton.cudagraphs": True}
    step_fn = model if backend is None else torch.compile(model, backend=backend, options=options)
    return training_step(step_fn, optimizer, nn.functional.cross_entropy)


def train(p, args, batches):
    """{variant: StepRuns} at p: every variant compiles and warms up first, then the rounds run
    the variants in turn."""
    torch._dynamo.reset()
    steps = {variant: trainer(variant, p, args) for variant in args.variants}
    runs = interleaved_steps(steps, batches, args.warmup, args.steps - args.warmup, args.rounds)
    counters = torch._dynamo.utils.counters
    print(f"  p {p}: {counters['stats']['unique_graphs']} graphs so far, {dict(counters['slicecompile'])}")
    return runs


def main():
    parser = argument_parser(__doc__, rounds=1)
    parser.add_argument("--p", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--channels", type=int, default=640)
    parser.add_argument("--size", type=int, default=8, help="height and width of the feature maps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="steps of each variant, --warmup of them once only")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--samples-per-group", type=int, default=8, help="the block policy's sample groups")
    parser.add_argument("--cudagraphs", action="store_true", help='CUDA graphs, as mode="reduce-overhead"')
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median (compilation)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    meta = run_metadata()
    out = CsvFile(RESULTS / "wrn_block.csv", FIELDS, meta)

    torch.manual_seed(0)
    shape = (args.batch, args.channels, args.size, args.size)
    # A learnable task: the class is a fixed random projection of the input's channel means.
    projection = torch.randn(args.channels, 100, device="cuda")
    batches = []
    for _ in range(4):
        x = torch.randn(shape, device="cuda")
        batches.append((x, (x.mean(dim=(2, 3)) @ projection).argmax(dim=1)))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        print(slicecompile.explain(Stage(args.blocks, args.channels, args.p[0]).cuda(), batches[0][0]))

    size = f"{args.channels} channels at {args.size}x{args.size}, batch {args.batch}"
    print(f"\n{meta['gpu']}: {args.blocks} WRN blocks, {size}")
    print(
        f"{'variant':<20}{'p':>5}{'step ms':>9}{'kernel ms':>11}{'vs inductor':>13}{'loss first':>12}{'loss last':>11}"
    )
    for p in args.p:
        results = train(p, args, batches)
        inductor_ms = results["inductor"].step_ms if "inductor" in results else None
        for variant, runs in results.items():
            step_ms, losses = runs.step_ms, runs.losses
            versus = f"{inductor_ms / step_ms:.2f}x" if inductor_ms else "-"
            rounds = f"  rounds {runs.spread}" if args.rounds > 1 else ""
            print(
                f"{variant:<20}{p:>5}{step_ms:>9.2f}{runs.kernel_ms:>11.2f}{versus:>13}{losses[0]:>12.4f}"
                f"{losses[-1]:>11.4f}{rounds}"
            )
            out.append(
                dict(
                    variant=variant,
                    mode="cudagraphs" if args.cudagraphs else "default",
                    samples_per_group=args.samples_per_group if variant == "slicecompile block" else "",
                    p=p,
                    blocks=args.blocks,
                    channels=args.channels,
                    size=args.size,
                    batch=args.batch,
                    step_ms=f"{step_ms:.3f}",
                    kernel_ms=f"{runs.kernel_ms:.3f}",
                    loss_first=f"{losses[0]:.5f}",
                    loss_last=f"{losses[-1]:.5f}",
                )
            )


if __name__ == "__main__":
    main()
