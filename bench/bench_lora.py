"""A LoRA fine-tuning step: a Llama-style model made from a config (no downloads; grouped-query
attention, a small vocabulary so that the layers dominate), PEFT adapters of rank 16 on all seven
projections (q, k, v, o, gate, up, down), the base frozen, AdamW on the adapters; at lora_dropout
0, 0.05 and 0.1, under backend="inductor" and backend="slicecompile", with Hugging Face's gradient
checkpointing off and on. Issue 28's question: what does lora_dropout cost, and does slicecompile
make it free?

On a GPU: the base model in bf16, the adapters in fp32 (PEFT's default), the step under bf16
autocast (what a bf16 Trainer run does); hidden 2048 and 4096, 2 layers, 4 x 2048 tokens;
slicecompile with its default options. Per configuration: wall ms per step (every configuration of
a model size takes a turn in each round; the median over all timed steps, ± half the range of the
rounds' medians), the summed GPU kernel ms of a step (torch.profiler), the step's peak memory above
what was allocated when it began (the weights and AdamW's state, alike in every row of a size, left
out), and the bytes saved for backward by one step (torch.autograd.graph.saved_tensors_hooks, each
storage once); ratios against Inductor at lora_dropout 0 with the same checkpointing. Rows go to
bench/results/lora.csv.

On a CPU (--device cpu): fp32, hidden 256, 1 layer, 2 x 128 tokens, wall ms and saved bytes only.
slicecompile runs with min_gemm_size=0 there: at these sizes the default size gate leaves every
adapter alone, as it would not at the GPU sizes. A CPU run only prints; it never writes into
bench/results/ (--csv elsewhere keeps its rows).

    python bench/bench_lora.py                          # hidden 2048 and 4096, 2 layers
    python bench/bench_lora.py --hidden 4096 --layers 4 --rounds 5
    python bench/bench_lora.py --device cpu --checkpointing off
"""

import gc
import json
import pathlib
import statistics
import warnings
from typing import NamedTuple

import peft
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch._dynamo.utils import counters

from slicecompile.tools.bench import CsvFile, argument_parser, interleaved_steps, run_metadata

RESULTS = pathlib.Path(__file__).parent / "results"
FIELDS = (
    "gpu hidden layers mlp heads kv_heads vocab rank tokens dtype checkpointing lora_dropout provider options "
    "rewritten step_ms spread_pct kernel_ms step_peak_mib saved_mib loss_first loss_last torch triton timestamp"
).split()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# hidden -> (MLP width, query heads, key/value heads): TinyLlama-1.1B's and Llama-3-8B's shapes,
# and a small one for the CPU
SHAPES = {256: (688, 4, 2), 2048: (5632, 32, 8), 4096: (14336, 32, 8)}
DEFAULTS = {  # per device type: hidden sizes, layers, batch, sequence, rounds, timed steps, options
    "cuda": dict(hidden=[2048, 4096], layers=2, batch=4, seq=2048, rounds=3, steps=10, options={}),
    "cpu": dict(hidden=[256], layers=1, batch=2, seq=128, rounds=2, steps=3, options={"min_gemm_size": 0}),
}
MIB = 2**20


class Config(NamedTuple):
    provider: str
    checkpointing: bool
    lora_dropout: float


class NextTokenLoss(nn.Module):
    """The compiled region: the model's forward and its next-token cross-entropy in fp32."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets):
        logits = self.model(input_ids=tokens, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def shape_of(hidden):
    mlp, heads, kv_heads = SHAPES.get(hidden, (round(2.75 * hidden / 64) * 64, hidden // 64, max(hidden // 256, 1)))
    return mlp, heads, kv_heads


def lora_llama(args, hidden, config, device):
    """A fresh Llama of args' shape with LoRA adapters (rank args.rank, alpha 2 x rank) on TARGETS."""
    mlp, heads, kv_heads = shape_of(hidden)
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=args.seq,
    )
    base = transformers.LlamaForCausalLM(llama).to(device, args.dtype)
    lora = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=config.lora_dropout, target_modules=TARGETS
    )
    model = peft.get_peft_model(base, lora).train()
    if config.checkpointing:
        # as tests/compiler/test_lora.py sets it up (README: "LoRA adapters")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.get_base_model().disable_input_require_grads()
    return model


def trainer(args, hidden, config, device, batch):
    """(step(tokens, targets) -> loss, sites rewritten): one configuration, compiled by its first step."""
    model = lora_llama(args, hidden, config, device)
    options = args.options if config.provider == "slicecompile" else None
    compiled = torch.compile(NextTokenLoss(model), backend=config.provider, options=options)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = args.dtype == torch.bfloat16

    def step(tokens, targets):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = compiled(tokens, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    before = counters["slicecompile"]["rewritten"]
    step(*batch)
    return step, counters["slicecompile"]["rewritten"] - before


def saved_bytes(step, batch):
    """Bytes saved for backward by one step, each storage once."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(*batch)
    return sum(storages.values())


def step_peak(step, batch):
    """A step's peak GPU memory above what was allocated when it began."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resting = torch.cuda.memory_allocated()
    step(*batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - resting


def run_size(args, hidden, device):
    """{Config: measurements} for one model size, every configuration interleaved with the others."""
    torch._dynamo.reset()  # no cache entries, nor sizes made dynamic, carried over from another size
    torch.manual_seed(0)
    tokens = torch.randint(args.vocab, (2, args.batch, args.seq + 1), device=device)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    configs = [
        Config(provider, checkpointing, p)
        for checkpointing in args.checkpointing
        for p in args.lora_dropout
        for provider in args.providers
    ]
    steps, rows = {}, {}
    for config in configs:
        steps[config], rewritten = trainer(args, hidden, config, device, batches[0])
        rows[config] = dict(rewritten=rewritten, saved_mib=saved_bytes(steps[config], batches[0]) / MIB)
    runs = interleaved_steps(steps, batches, args.warmup, args.steps, args.rounds, device)
    for config, run in runs.items():
        rounds = [statistics.median(times) for times in run.rounds]
        rows[config] |= dict(
            step_ms=run.step_ms,
            spread_pct=100 * (max(rounds) - min(rounds)) / 2 / run.step_ms,
            kernel_ms=run.kernel_ms,
            step_peak_mib=step_peak(steps[config], batches[0]) / MIB if device.type == "cuda" else None,
            loss_first=run.losses[0],
            loss_last=run.losses[-1],
        )
    del steps, runs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_table(rows):
    """Each configuration, and its ratio (x) to Inductor at lora_dropout 0 with the same checkpointing."""
    columns = {"step_ms": "step ms", "kernel_ms": "GPU ms", "step_peak_mib": "peak MiB", "saved_mib": "saved MiB"}
    print(
        f"{'provider':<13}{'ckpt':<5}{'p':>5}{'rewritten':>10}" + "".join(f"{h:>11}{'x':>7}" for h in columns.values())
    )
    for config, row in rows.items():
        base = rows.get(Config("inductor", config.checkpointing, 0.0), {})
        cells = f"{config.provider:<13}{'on' if config.checkpointing else 'off':<5}{config.lora_dropout:>5}"
        cells += f"{row['rewritten']:>10}"
        for column in columns:
            value, reference = row[column], base.get(column)
            cells += f"{value:>11.2f}" if value is not None else f"{'-':>11}"
            cells += f"{value / reference:>7.3f}" if value is not None and reference else f"{'-':>7}"
        print(f"{cells}  step ms ±{row['spread_pct']:.1f}% over rounds", flush=True)


def csv_file(args, device, meta):
    """The CSV the rows go to, or None: a CPU run writes only where --csv says, never under RESULTS."""
    path = args.csv or (RESULTS / "lora.csv" if device.type == "cuda" else None)
    if path is None:
        return None
    path = pathlib.Path(path)
    if device.type != "cuda" and RESULTS.resolve() in path.resolve().parents:
        raise SystemExit(f"a CPU run does not write into {RESULTS}: pass --csv elsewhere")
    return CsvFile(path, FIELDS, meta)


def parse_args():
    cli = argument_parser(__doc__, rounds=None, device="cuda")
    cli.add_argument("--hidden", type=int, nargs="+", help="model widths (GPU 2048 4096, CPU 256)")
    cli.add_argument("--layers", type=int, help="decoder layers (GPU 2, CPU 1)")
    cli.add_argument("--batch", type=int, help="sequences a step (GPU 4, CPU 2)")
    cli.add_argument("--seq", type=int, help="tokens a sequence (GPU 2048, CPU 128)")
    cli.add_argument("--vocab", type=int, default=1024)
    cli.add_argument("--rank", type=int, default=16)
    cli.add_argument("--lora-dropout", type=float, nargs="+", default=[0.0, 0.05, 0.1])
    cli.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    cli.add_argument(
        "--providers", nargs="+", choices=["inductor", "slicecompile"], default=["inductor", "slicecompile"]
    )
    cli.add_argument(
        "--options", type=json.loads, help='slicecompile\'s options as JSON (GPU {}, CPU {"min_gemm_size": 0})'
    )
    cli.add_argument("--rounds", type=int, help="rounds, each running every configuration in turn (GPU 3, CPU 2)")
    cli.add_argument("--steps", type=int, help="timed steps of each configuration a round (GPU 10, CPU 3)")
    cli.add_argument("--warmup", type=int, default=2, help="steps after the compiling one, before any is timed")
    cli.add_argument("--csv", help="where rows go (GPU default bench/results/lora.csv; a CPU run: nowhere)")
    args = cli.parse_args()
    for key, value in DEFAULTS[args.device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.checkpointing = [mode == "on" for mode in args.checkpointing]
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    return args


def main():
    args = parse_args()
    device = args.device
    # Every configuration of a size compiles the same code objects (one cache entry each).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False  # each configuration's own static graph
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True  # README: "LoRA adapters"
    meta = run_metadata(device)
    out = csv_file(args, device, meta)
    for hidden in args.hidden:
        mlp, heads, kv_heads = shape_of(hidden)
        print(
            f"\n{meta['gpu']}: Llama, hidden {hidden}, MLP {mlp}, {heads}/{kv_heads} heads, {args.layers} layers, "
            f"LoRA r {args.rank} on {len(TARGETS)} projections, {args.batch} x {args.seq} tokens, "
            f"{str(args.dtype).replace('torch.', '')}, slicecompile options {args.options}; x: against Inductor at "
            "lora_dropout 0, same checkpointing"
        )
        rows = run_size(args, hidden, device)
        print_table(rows)
        if out is None:
            continue
        for config, row in rows.items():
            out.append(
                dict(
                    hidden=hidden,
                    layers=args.layers,
                    mlp=mlp,
                    heads=heads,
                    kv_heads=kv_heads,
                    vocab=args.vocab,
                    rank=args.rank,
                    tokens=f"{args.batch}x{args.seq}",
                    dtype=str(args.dtype).replace("torch.", ""),
                    checkpointing=config.checkpointing,
                    lora_dropout=config.lora_dropout,
                    provider=config.provider,
                    options=json.dumps(args.options) if config.provider == "slicecompile" else "",
                    **{key: f"{value:.4g}" if isinstance(value, float) else value for key, value in row.items()},
                )
            )


if __name__ == "__main__":
    main()
