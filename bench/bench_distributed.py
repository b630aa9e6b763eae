"""Data-parallel training step of bench_encoder's 4-layer encoder (d_model 1024, FFN 4096, 8192
tokens a step per rank, bf16 autocast, AdamW) wrapped in DistributedDataParallel, under
backend="inductor" and backend="slicecompile" with the block and the slice policy, at each p.
Reports the median step time (the slowest rank's, per step), the speed-up over Inductor at the
same p, how many dropout sites slicecompile rewrote and the loss; rank 0 appends rows to
bench/results/distributed_encoder.csv (--out).

DDPOptimizer (torch._dynamo.config.optimize_ddp, on unless --no-graph-split) compiles one
graph per gradient bucket; slicecompile rewrites the whole graph before that split, so a bucket
boundary between a dropout and its linear layer keeps the site (the "rewritten" column).

    torchrun --nproc-per-node 2 bench/bench_distributed.py
    TRITON_INTERPRET=1 torchrun --nproc-per-node 2 bench/bench_distributed.py --device cpu \\
        --tokens 256 --d-model 128 --steps 3      # a smoke test on the CPU (gloo)
"""

import os
import pathlib
import statistics

import torch

# Without a GPU the kernels run in Triton's interpreter, which must be on before slicecompile is
# imported (bench_encoder imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SLICECOMPILE_AUTOTUNE", "0")

import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from bench_encoder import Encoder  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from slicecompile.tools.bench import CsvFile, argument_parser, run_metadata, training_step  # noqa: E402
from slicecompile.tools.timing import timed_steps  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
FIELDS = "gpu world_size variant p ddp_split bucket_cap_mb layers d_model ffn tokens_per_rank step_ms".split()
FIELDS += "speedup_vs_inductor rewritten loss_first loss_last torch triton timestamp".split()
VARIANTS = {
    "inductor": ("inductor", None),
    "slicecompile block": ("slicecompile", {"policy": "block"}),
    "slicecompile slice": ("slicecompile", {"policy": "slice"}),
}


def parse_args():
    parser = argument_parser(__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo and Triton's interpreter")
    parser.add_argument("--p", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median (compilation)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=None, help="default: 4 x d_model")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens a step on each rank")
    parser.add_argument("--seq", type=int, default=1024, help="sequence length (at most --tokens)")
    parser.add_argument("--bucket-cap-mb", type=float, default=25, help="DDP's bucket size (its default: 25)")
    parser.add_argument("--no-graph-split", action="store_true", help="torch._dynamo.config.optimize_ddp = False")
    parser.add_argument("--min-gemm-size", type=int, default=None, help="slicecompile's option (default: its own)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "distributed_encoder.csv")
    args = parser.parse_args()
    args.ffn = args.ffn or 4 * args.d_model
    args.seq = min(args.seq, args.tokens)
    if args.tokens % args.seq:
        parser.error(f"--tokens {args.tokens} is not a multiple of --seq {args.seq}")
    args.warmup = min(args.warmup, args.steps - 1)
    return args


def setup(args):
    """The process group and this rank's device."""
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group("gloo")
    return torch.device("cpu")


def make_batches(args, device):
    """Four (input, target) batches, different on every rank; the target is a fixed random
    teacher's output, as in bench_encoder."""
    torch.manual_seed(0)
    teacher = nn.Linear(args.d_model, args.d_model).to(device)
    torch.manual_seed(1 + dist.get_rank())
    batches = []
    for _ in range(4):
        x = torch.randn(args.tokens // args.seq, args.seq, args.d_model, device=device)
        batches.append((x, teacher(x).detach().tanh()))
    return batches


def timed(step, batches, args, device):
    """Each step's wall ms, the slowest rank's, and the mean loss over ranks."""
    times, losses = timed_steps(step, batches, args.steps, device)
    times, losses = torch.tensor(times, device=device), torch.tensor(losses, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    dist.all_reduce(losses)
    return times.tolist(), (losses / dist.get_world_size()).tolist()


def train(variant, p, args, batches, device):
    torch._dynamo.reset()
    counters["slicecompile"].clear()
    torch.manual_seed(0)
    model = Encoder(args.d_model, args.ffn, args.layers, p).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=args.bucket_cap_mb)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    backend, options = VARIANTS[variant]
    if backend == "slicecompile" and args.min_gemm_size is not None:
        options = {**options, "min_gemm_size": args.min_gemm_size}
    compiled = torch.compile(ddp, backend=backend, options=options)
    step = training_step(compiled, optimizer, nn.functional.mse_loss, device.type)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    times, losses = timed(step, batches, args, device)
    stats = counters["slicecompile"]
    rewritten = f"{stats['rewritten']}/{stats['sites']}" if backend == "slicecompile" else ""
    return statistics.median(times[args.warmup :]), rewritten, losses


def main():
    args = parse_args()
    torch._dynamo.config.optimize_ddp = not args.no_graph_split
    device = setup(args)
    meta = run_metadata(device)
    out = CsvFile(args.out, FIELDS, meta)  # every rank checks the file's header before the run
    batches = make_batches(args, device)
    world, rank = dist.get_world_size(), dist.get_rank()
    if rank == 0:
        print_header(args, meta["gpu"], world)
    for p in args.p:
        inductor_ms = None
        for variant in args.variants:
            step_ms, rewritten, losses = train(variant, p, args, batches, device)
            inductor_ms = step_ms if variant == "inductor" else inductor_ms
            row = dict(
                world_size=world,
                variant=variant,
                p=p,
                ddp_split=not args.no_graph_split,
                bucket_cap_mb=args.bucket_cap_mb,
                layers=args.layers,
                d_model=args.d_model,
                ffn=args.ffn,
                tokens_per_rank=args.tokens,
                step_ms=f"{step_ms:.3f}",
                speedup_vs_inductor=f"{inductor_ms / step_ms:.3f}" if inductor_ms else "",
                rewritten=rewritten,
                loss_first=f"{losses[0]:.5f}",
                loss_last=f"{losses[-1]:.5f}",
            )
            if rank == 0:
                print_row(row)
                out.append(row)
    if rank == 0:
        print(f"rows appended to {out.path}")
    dist.destroy_process_group()


def print_header(args, gpu, world):
    split = "DDPOptimizer graph split" if not args.no_graph_split else "no graph split"
    print(
        f"\n{gpu} x {world}: DDP {args.layers}-layer encoder, d_model {args.d_model}, FFN {args.ffn}, "
        f"{args.tokens} tokens/step/rank, bf16 autocast, {args.steps} steps ({args.warmup} left out), "
        f"{split}, {args.bucket_cap_mb:g} MB buckets"
    )
    print(
        f"{'variant':<20}{'p':>5}{'step ms':>10}{'vs inductor':>13}{'rewritten':>11}{'loss first':>12}{'loss last':>11}"
    )


def print_row(row):
    versus = f"{float(row['speedup_vs_inductor']):.2f}x" if row["speedup_vs_inductor"] else "-"
    print(
        f"{row['variant']:<20}{row['p']:>5}{float(row['step_ms']):>10.2f}{versus:>13}{row['rewritten'] or '-':>11}"
        f"{float(row['loss_first']):>12.4f}{float(row['loss_last']):>11.4f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
