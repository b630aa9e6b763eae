"""Training step of GPT-2-style Transformer blocks, written as user modules in nanoGPT's style (pre-LayerNorm
causal self-attention with eager softmax attention, and a tanh-GELU MLP; by default GPT-2 small's width:
d_model 768, 12 heads, 4 blocks, sequence 1024, batch 8 = 8192 tokens a step, bf16 autocast, AdamW) under
eager, backend="inductor" and backend="slicecompile". Its dropouts are GPT-2's: softmax -> dropout -> @ v in
attention, and the residual dropouts (c_proj -> dropout -> residual add) after attention and after the MLP.
For each p it prints slicecompile.explain's site table, then per backend the median step time (with --rounds,
the backends take turns), the summed GPU kernel time of a step (torch.profiler), the loss over the run and
the step time relative to inductor's, and appends rows to bench/results/gpt2_block.csv. --model hf runs
Hugging Face's GPT2Model instead, with its default attention (SDPA with dropout_p: the sdpa_dropout row), and
appends to gpt2_block_hf.csv.

    python bench/bench_gpt2_block.py --p 0.1 0.5
    python bench/bench_gpt2_block.py --model hf    # Hugging Face's GPT2Model, default (SDPA) attention
    python bench/bench_gpt2_block.py --backends inductor slicecompile-output --cudagraphs
    python bench/bench_gpt2_block.py --device cpu --d-model 128 --heads 4 --seq 64 --batch 2 --layers 2 \\
        --steps 3 --warmup 1 --csv /tmp/gpt2_block.csv    # CPU smoke run: perf_counter timing, no kernel time
"""

import math
import pathlib

import torch
import torch.nn as nn

import slicecompile
from slicecompile.tools.bench import CsvFile, argument_parser, interleaved_steps, run_metadata, training_step

RESULTS = pathlib.Path(__file__).parent / "results"
FIELDS = "gpu backend p layers d_model heads tokens step_ms kernel_ms loss_first loss_last".split()
FIELDS += "torch triton timestamp".split()


# slicecompile with one side turned off: the attention dropout alone (input side), or the residual
# dropouts alone (output side).
VARIANTS = {
    "slicecompile-input": ("slicecompile", {"output_side": False}),
    "slicecompile-output": ("slicecompile", {"input_side": False}),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, heads, seq, p):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.attn_dropout, self.resid_dropout = nn.Dropout(p), nn.Dropout(p)
        self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).tril().view(1, 1, seq, seq))

    def forward(self, x):
        batch, seq, d_model = x.shape
        q, k, v = (
            t.view(batch, seq, self.heads, d_model // self.heads).transpose(1, 2)
            for t in self.c_attn(x).split(d_model, dim=2)
        )
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(~self.causal[:, :, :seq, :seq], float("-inf")).softmax(dim=-1)
        y = (self.attn_dropout(att) @ v).transpose(1, 2).contiguous().view(batch, seq, d_model)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, d_model, p):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, d_model, heads, seq, p):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, seq, p)
        self.mlp = MLP(d_model, p)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Blocks(nn.Module):
    """The Transformer of GPT-2 without its embeddings and head: (batch, seq, d_model) in and out."""

    def __init__(self, d_model, heads, seq, layers, p):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(d_model, heads, seq, p) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, x):
        return self.ln_f(self.blocks(x))


class HuggingFaceGPT2(nn.Module):
    """Hugging Face's GPT2Model with its default attention (F.scaled_dot_product_attention with
    dropout_p in training), fed the hidden states as inputs_embeds (its position embeddings and
    embedding dropout included)."""

    def __init__(self, d_model, heads, seq, layers, p):
        super().__init__()
        import transformers

        config = transformers.GPT2Config(
            vocab_size=8, n_positions=seq, n_embd=d_model, n_head=heads, n_layer=layers,
            resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
        )  # fmt: skip
        self.gpt2 = transformers.GPT2Model(config)

    def forward(self, x):
        return self.gpt2(inputs_embeds=x).last_hidden_state


MODELS = {"nanogpt": GPT2Blocks, "hf": HuggingFaceGPT2}


def make_model(p, args):
    return MODELS[args.model](args.d_model, args.heads, args.seq, args.layers, p).to(args.device)


def trainer(backend, p, args):
    """A training step of a fresh model under backend: step(x, y) -> loss."""
    torch.manual_seed(0)
    model = make_model(p, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_fn = model
    if backend != "eager":
        compile_backend, options = VARIANTS.get(backend, (backend, {}))
        options = {**options, "triton.cudagraphs": True} if args.cudagraphs else options
        step_fn = torch.compile(model, backend=compile_backend, options=options or None)
    return training_step(step_fn, optimizer, nn.functional.mse_loss, args.device.type)


def train(p, args, batches):
    """{backend: StepRuns} at p: every backend compiles and warms up first, then the rounds run
    the backends in turn."""
    torch._dynamo.reset()
    steps = {backend: trainer(backend, p, args) for backend in args.backends}
    return interleaved_steps(steps, batches, args.warmup, args.steps - args.warmup, args.rounds, args.device)


def main():
    parser = argument_parser(__doc__, rounds=1, device="cuda")
    parser.add_argument("--model", choices=MODELS, default="nanogpt", help="hf: Hugging Face's GPT2Model (SDPA)")
    parser.add_argument("--steps", type=int, default=50, help="steps of each backend, --warmup of them once only")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median (compilation)")
    parser.add_argument("--p", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument(
        "--backends", nargs="+", default=["eager", "inductor", "slicecompile"], help=f"or {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--cudagraphs", action="store_true", help="compile with CUDA graphs (Inductor's triton.cudagraphs)"
    )
    parser.add_argument("--csv", type=pathlib.Path, default=None, help="default: results/gpt2_block[_hf].csv")
    args = parser.parse_args()
    args.csv = args.csv or RESULTS / ("gpt2_block.csv" if args.model == "nanogpt" else f"gpt2_block_{args.model}.csv")
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    meta = run_metadata(args.device)
    out = CsvFile(args.csv, FIELDS, meta)

    torch.manual_seed(0)
    teacher = nn.Linear(args.d_model, args.d_model).to(args.device)
    batches = []
    for _ in range(4):
        x = torch.randn(args.batch, args.seq, args.d_model, device=args.device)
        batches.append((x, teacher(x).detach().tanh()))

    tokens = args.batch * args.seq
    for p in args.p:
        with torch.autocast(args.device.type, dtype=torch.bfloat16):
            print(f"\np {p}:\n{slicecompile.explain(make_model(p, args), batches[0][0])}")
        results = train(p, args, batches)
        inductor_ms = results["inductor"].step_ms if "inductor" in results else None
        print(
            f"\n{meta['gpu']}: {args.layers} GPT-2 blocks, d_model {args.d_model}, {args.heads} heads, p {p}, "
            f"{tokens} tokens/step, bf16 autocast, {args.steps} steps"
        )
        print(f"{'backend':<22}{'step ms':>9}{'kernel ms':>11}{'/inductor':>11}{'loss first':>12}{'loss last':>11}")
        for backend, runs in results.items():
            step_ms, gpu_ms, losses = runs.step_ms, runs.kernel_ms, runs.losses
            ratio = f"{step_ms / inductor_ms:.3f}" if inductor_ms else "-"
            gpu_text = "-" if gpu_ms is None else f"{gpu_ms:.2f}"
            rounds = f"  rounds {runs.spread}" if args.rounds > 1 else ""
            print(f"{backend:<22}{step_ms:>9.2f}{gpu_text:>11}{ratio:>11}{losses[0]:>12.4f}{losses[-1]:>11.4f}{rounds}")
            out.append(
                dict(
                    backend=backend if backend == "eager" or not args.cudagraphs else f"{backend} (cudagraphs)",
                    p=p,
                    layers=args.layers,
                    d_model=args.d_model,
                    heads=args.heads,
                    tokens=tokens,
                    step_ms=f"{step_ms:.3f}",
                    kernel_ms="" if gpu_ms is None else f"{gpu_ms:.3f}",
                    loss_first=f"{losses[0]:.5f}",
                    loss_last=f"{losses[-1]:.5f}",
                )
            )


if __name__ == "__main__":
    main()
