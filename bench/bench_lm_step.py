"""One training step of the demo's language model (6 layers, width 384, batch 64 x 256 bytes,
bf16 autocast, AdamW) under Inductor and slicecompile, with dropout on both sites (attention
probabilities and MLP) or on the MLP only: wall ms per step (30 steps after 5 of warm-up) and
the summed GPU kernel time of a step, with the six costliest kernels. Prints a table.

    python bench/bench_lm_step.py
"""

import time

import torch
from torch.profiler import ProfilerActivity, profile

from slicecompile.demo.model import Config, LanguageModel

CASES = [
    ("Inductor, attention and MLP dropout", "inductor", None, 0.1),
    ("slicecompile block, both sites", "slicecompile", {"policy": "block"}, 0.1),
    ("Inductor, MLP dropout only", "inductor", None, 0.0),
    ("slicecompile block, MLP site only", "slicecompile", {"policy": "block"}, 0.0),
    ("slicecompile slice, MLP site only", "slicecompile", {"policy": "slice"}, 0.0),
]


def step_times(backend, options, attention_p, p=0.1, steps=30):
    torch._dynamo.reset()
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

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps * 1000
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda event: -event.self_device_time_total)
    gpu = sum(event.self_device_time_total for event in events) / 5 / 1000
    top = "; ".join(f"{event.key[:50]} {event.self_device_time_total / 5000:.2f}" for event in events[:6])
    return wall, gpu, top


def main():
    print(f"{torch.cuda.get_device_name()}: ms per training step")
    for name, backend, options, attention_p in CASES:
        wall, gpu, top = step_times(backend, options, attention_p)
        print(f"{name:<38} wall {wall:6.2f}  GPU {gpu:6.2f} | {top}", flush=True)


if __name__ == "__main__":
    main()
