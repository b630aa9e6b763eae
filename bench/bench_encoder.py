"""End-to-end training step of a 4-layer nn.TransformerEncoder (d_model 1024, FFN 4096,
dropout 0.5, 8192 tokens a step, bf16 autocast, AdamW) under eager, backend="inductor" and
backend="slicecompile": step time (median over timed steps, CUDA events; with --rounds, the
backends take turns, and the rounds' median ± half their range is printed), the summed GPU
kernel time of a step (torch.profiler), and the loss over the run, so one sees that the model
trains. Appends rows to bench/results/encoder.csv.

    python bench/bench_encoder.py --steps 50
    python bench/bench_encoder.py --steps 20 --rounds 5 --backends inductor slicecompile
"""

import pathlib

import torch
import torch.nn as nn

import slicecompile
from slicecompile.tools.bench import CsvFile, argument_parser, interleaved_steps, run_metadata, training_step

RESULTS = pathlib.Path(__file__).parent / "results"
FIELDS = "gpu backend p layers d_model ffn tokens step_ms kernel_ms loss_first loss_last torch triton timestamp".split()


class Encoder(nn.Module):
    """A user-defined wrapper: Dynamo does not trace torch.nn's own classes as top-level frames."""

    def __init__(self, d_model, ffn, layers, p):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, 16, ffn, dropout=p, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, d_model)

    def forward(self, x):
        return self.head(self.encoder(x))


def trainer(backend, args):
    """A training step of a fresh model under backend: step(x, y) -> loss."""
    torch.manual_seed(0)
    model = Encoder(args.d_model, args.ffn, args.layers, args.p).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    name, _, rewrite = backend.partition(":")  # "slicecompile:always": options={"rewrite": "always"}
    settings = {"options": {"rewrite": rewrite}} if rewrite else {"mode": args.mode}
    step_fn = model if backend == "eager" else torch.compile(model, backend=name, **settings)
    return training_step(step_fn, optimizer, nn.functional.mse_loss)


def main():
    parser = argument_parser(__doc__, rounds=1)
    parser.add_argument("--steps", type=int, default=50, help="timed steps of each backend per round")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing (compilation)")
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["eager", "inductor", "slicecompile"],
        help='"slicecompile:always" passes options={"rewrite": "always"}',
    )
    parser.add_argument("--mode", default=None, help='torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)')
    args = parser.parse_args()
    meta = run_metadata()
    out = CsvFile(RESULTS / "encoder.csv", FIELDS, meta)

    torch.manual_seed(0)
    teacher = nn.Linear(args.d_model, args.d_model).cuda()
    batches = []
    for _ in range(4):
        x = torch.randn(args.batch, args.seq, args.d_model, device="cuda")
        batches.append((x, teacher(x).detach().tanh()))

    probe = Encoder(args.d_model, args.ffn, args.layers, args.p).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        print(slicecompile.explain(probe, batches[0][0]))

    print(
        f"\n{meta['gpu']}: {args.layers}-layer encoder, d_model {args.d_model}, FFN {args.ffn}, p {args.p}, "
        f"{args.batch * args.seq} tokens/step, bf16 autocast, {args.steps} steps"
    )
    print(f"{'backend':<14}{'step ms':>9}{'kernel ms':>11}{'loss first':>12}{'loss last':>11}")
    steps = {backend: trainer(backend, args) for backend in args.backends}
    for backend, runs in interleaved_steps(steps, batches, args.warmup, args.steps, args.rounds).items():
        losses = runs.losses
        rounds = f"  rounds {runs.spread}" if args.rounds > 1 else ""
        print(f"{backend:<14}{runs.step_ms:>9.2f}{runs.kernel_ms:>11.2f}{losses[0]:>12.4f}{losses[-1]:>11.4f}{rounds}")
        out.append(
            dict(
                backend=backend if backend == "eager" or not args.mode else f"{backend} ({args.mode})",
                p=args.p,
                layers=args.layers,
                d_model=args.d_model,
                ffn=args.ffn,
                tokens=args.batch * args.seq,
                step_ms=f"{runs.step_ms:.3f}",
                kernel_ms=f"{runs.kernel_ms:.3f}",
                loss_first=f"{losses[0]:.5f}",
                loss_last=f"{losses[-1]:.5f}",
            )
        )


if __name__ == "__main__":
    main()
