"""One training step of the demo's language model (6 layers, width 384, batch 64 x 256 bytes,
bf16 autocast, AdamW) under Inductor and slicecompile, with dropout on both sites (attention
probabilities and MLP) or on the MLP only: wall ms per step (30 steps after 5 of warm-up; with
--rounds, the configurations take turns and the median over rounds is shown) and the summed GPU
kernel time of a step, with the six costliest kernels. Prints a table.

    python bench/bench_lm_step.py
    python bench/bench_lm_step.py --rounds 5
"""

import functools

import torch
from torch.profiler import ProfilerActivity, profile

from slicecompile.demo.model import Config, LanguageModel
from slicecompile.tools.bench import Spread, argument_parser, device_name, interleave
from slicecompile.tools.timing import mean_call_ms

CASES = [
    ("Inductor, attention and MLP dropout", "inductor", None, 0.1),
    ("slicecompile block, both sites", "slicecompile", {"policy": "block"}, 0.1),
    ("Inductor, MLP dropout only", "inductor", None, 0.0),
    ("slicecompile block, MLP site only", "slicecompile", {"policy": "block"}, 0.0),
    ("slicecompile slice, MLP site only", "slicecompile", {"policy": "slice"}, 0.0),
]


def trainer(backend, options, attention_p, p=0.1):
    """A training step of a fresh model: step() runs one on a fixed batch."""
    torch.manual_seed(0)
    model = LanguageModel(Config(context=256, layers=6, heads=6, width=384, p=p)).cuda()
    for block in model.blocks:
        block.attention.drop.p = attention_p
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend=backend, options=options)
    tokens = torch.randint(256, (64, 257), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def kernels(step, steps=5):
    """The summed GPU kernel ms of a step, and its six costliest kernels."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda event: -event.self_device_time_total)
    gpu = sum(event.self_device_time_total for event in events) / steps / 1000
    top = "; ".join(f"{event.key[:50]} {event.self_device_time_total / steps / 1000:.2f}" for event in events[:6])
    return gpu, top


def main():
    args = argument_parser(__doc__, rounds=1).parse_args()
    steps = {name: trainer(backend, options, attention_p) for name, backend, options, attention_p in CASES}
    timers = {name: functools.partial(mean_call_ms, step, 30, warmup=5) for name, step in steps.items()}
    walls = interleave(timers, args.rounds)
    print(f"{device_name()}: ms per training step")
    for name, step in steps.items():
        wall, (gpu, top) = Spread.of(walls[name]), kernels(step)
        rounds = f" ±{100 * wall.half_range:.1f}%" if args.rounds > 1 else ""
        print(f"{name:<38} wall {wall.median:6.2f}{rounds}  GPU {gpu:6.2f} | {top}", flush=True)


if __name__ == "__main__":
    main()
