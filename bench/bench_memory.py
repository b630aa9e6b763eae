"""Peak GPU memory of one training step of the 4-layer encoder (bench_encoder.Encoder: d_model
1024, FFN 4096, 8192 tokens, bf16 autocast, AdamW) under eager, backend="inductor" and
backend="slicecompile" with the block and the slice policy, at each p. Columns: the peak of
the step (torch.cuda.max_memory_allocated), what was allocated when the step began (weights,
AdamW state, inputs) and their difference, the step's own peak (activations and gradients).
Appends rows to bench/results/encoder_memory.csv.

    python bench/bench_memory.py --p 0.1 0.5
"""

import pathlib

import torch
import torch.nn as nn
from bench_encoder import Encoder

from slicecompile.tools.bench import CsvFile, argument_parser, run_metadata, training_step

RESULTS = pathlib.Path(__file__).parent / "results"
FIELDS = "gpu variant p layers d_model ffn tokens peak_mib resting_mib step_mib torch triton timestamp".split()
VARIANTS = {
    "eager": (None, None),
    "inductor": ("inductor", None),
    "slicecompile block": ("slicecompile", {"policy": "block"}),
    "slicecompile slice": ("slicecompile", {"policy": "slice"}),
}


def peak_of_a_step(variant, p, args, x, y):
    """(peak, resting) bytes of the third step (the first two compile and allocate AdamW state)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Encoder(args.d_model, args.ffn, args.layers, p).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    backend, options = VARIANTS[variant]
    step_fn = model if backend is None else torch.compile(model, backend=backend, options=options)
    step = training_step(step_fn, optimizer, nn.functional.mse_loss)
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
        step(x, y)
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, optimizer, step_fn, step
    torch.cuda.empty_cache()
    return peak, resting


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--p", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    meta = run_metadata()
    out = CsvFile(RESULTS / "encoder_memory.csv", FIELDS, meta)

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.d_model, device="cuda")
    y = torch.randn(args.batch, args.seq, args.d_model, device="cuda").tanh()
    mib, tokens = 2**20, args.batch * args.seq
    print(f"{meta['gpu']}: {args.layers}-layer encoder, d_model {args.d_model}, FFN {args.ffn}, {tokens} tokens")
    print(f"{'variant':<20}{'p':>5}{'peak MiB':>10}{'resting':>9}{'step MiB':>10}{'step vs eager':>15}")
    for p in args.p:
        eager_step = None
        for variant in args.variants:
            peak, resting = peak_of_a_step(variant, p, args, x, y)
            step = peak - resting
            eager_step = eager_step or (step if variant == "eager" else None)
            versus = f"{step / eager_step - 1:+.1%}" if eager_step else "-"
            print(f"{variant:<20}{p:>5}{peak / mib:>10.0f}{resting / mib:>9.0f}{step / mib:>10.0f}{versus:>15}")
            out.append(
                dict(
                    variant=variant,
                    p=p,
                    layers=args.layers,
                    d_model=args.d_model,
                    ffn=args.ffn,
                    tokens=tokens,
                    peak_mib=f"{peak / mib:.1f}",
                    resting_mib=f"{resting / mib:.1f}",
                    step_mib=f"{step / mib:.1f}",
                )
            )


if __name__ == "__main__":
    main()
