"""End-to-end training step of a 4-layer nn.TransformerEncoder (d_model 1024, FFN 4096,
dropout 0.5, 8192 tokens a step, bf16 autocast, AdamW) under eager, backend="inductor" and
backend="slicecompile": step time (median over timed steps, CUDA events; with --rounds, the
backends take turns, and each round's median is printed), the summed GPU kernel time of a step
(torch.profiler), and the loss over the run, so one sees that the model trains. Appends rows to
bench/results/encoder.csv.

    python bench/bench_encoder.py --steps 50
    python bench/bench_encoder.py --steps 20 --rounds 5 --backends inductor slicecompile
"""

import argparse
import csv
import datetime
import pathlib
import statistics

import torch
import torch.nn as nn
import triton

import slicecompile
from slicecompile.tools.timing import kernel_ms, timed_steps

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

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(step_fn(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def train(backends, args, batches):
    """{backend: (median step ms, each round's median, GPU ms, losses)}: every backend compiles and
    warms up first, then the rounds run the backends in turn, so that a drift of the machine
    touches all of them alike."""
    steps = {backend: trainer(backend, args) for backend in backends}
    times, losses = {b: [] for b in backends}, {}
    for backend, step in steps.items():
        losses[backend] = timed_steps(step, batches, args.warmup)[1]
    for _ in range(args.rounds):
        for backend, step in steps.items():
            round_times, round_losses = timed_steps(step, batches, args.steps)
            times[backend].append(round_times)
            losses[backend] += round_losses
    x, y = batches[0]
    results = {}
    for backend, step in steps.items():
        medians = [statistics.median(t) for t in times[backend]]
        every = statistics.median([t for round_times in times[backend] for t in round_times])
        results[backend] = every, medians, kernel_ms(lambda step=step: step(x, y), steps=5), losses[backend]
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing (compilation)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of --steps steps, the backends interleaved")
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

    torch.manual_seed(0)
    teacher = nn.Linear(args.d_model, args.d_model).cuda()
    batches = []
    for _ in range(4):
        x = torch.randn(args.batch, args.seq, args.d_model, device="cuda")
        batches.append((x, teacher(x).detach().tanh()))

    probe = Encoder(args.d_model, args.ffn, args.layers, args.p).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        print(slicecompile.explain(probe, batches[0][0]))

    gpu = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "encoder.csv"
    new = not out.exists()
    print(
        f"\n{gpu}: {args.layers}-layer encoder, d_model {args.d_model}, FFN {args.ffn}, p {args.p}, "
        f"{args.batch * args.seq} tokens/step, bf16 autocast, {args.steps} steps"
    )
    print(f"{'backend':<14}{'step ms':>9}{'kernel ms':>11}{'loss first':>12}{'loss last':>11}")
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        for backend, (step_ms, medians, gpu_ms, losses) in train(args.backends, args, batches).items():
            spread = f"  rounds {min(medians):.2f}-{max(medians):.2f}" if len(medians) > 1 else ""
            print(f"{backend:<14}{step_ms:>9.2f}{gpu_ms:>11.2f}{losses[0]:>12.4f}{losses[-1]:>11.4f}{spread}")
            writer.writerow(
                dict(
                    gpu=gpu,
                    backend=backend if backend == "eager" or not args.mode else f"{backend} ({args.mode})",
                    p=args.p,
                    layers=args.layers,
                    d_model=args.d_model,
                    ffn=args.ffn,
                    tokens=args.batch * args.seq,
                    step_ms=f"{step_ms:.3f}",
                    kernel_ms=f"{gpu_ms:.3f}",
                    loss_first=f"{losses[0]:.5f}",
                    loss_last=f"{losses[-1]:.5f}",
                    torch=torch.__version__,
                    triton=triton.__version__,
                    timestamp=stamp,
                )
            )


if __name__ == "__main__":
    main()
