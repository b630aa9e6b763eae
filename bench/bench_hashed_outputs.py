"""Forward + backward time and peak memory of a large output layer's cross-entropy: the dense
F.cross_entropy(F.linear(x, W, b), t) against slicecompile.hashed_linear_cross_entropy (SLIDE's
sampled softmax on output tiles) at each --active.

Shapes: amazon, Amazon-670K's extreme classifier (E 128, N 670,091, batch 256); lm, a GPT-2
LM head (E 768, N 50,304, 2,048 tokens); or M,E,N. Providers: dense (eager), hashed (the op,
eager), and on CUDA dense_inductor (the dense loss under torch.compile) and liger (Liger-Kernel's
LigerFusedLinearCrossEntropyLoss, chunked, never the full logits; skipped if not importable).
hashed_codes is the op with a WeightCodes (refresh="auto"), keeping the weight's hash between
steps: its time is the mean over whole refresh periods, re-hashing steps included. selection is
select_active_tiles alone (hashing the weight every call), the part of hashed's time that chooses.
On CUDA, hashed_inductor is the op under torch.compile (Inductor fuses its elementwise work
around the kernels), at the --compiled-active shares.

Time: the median wall time of a step (slicecompile.tools.timing.median_ms: CUDA events through
do_bench on a GPU, perf_counter on a CPU), gradients reset to None before each step, so dW's
allocation is part of every step. Peak memory: what one step holds at its peak above what was
held before it (inputs and weights excluded; the new gradients included). On CUDA,
torch.cuda.max_memory_allocated. On a CPU, the process's resident high-water mark (VmHWM, reset
through /proc/self/clear_refs) above its resident set before the step, with glibc told to
serve every allocation of 64 KiB or more by mmap so that freed tensors leave the resident set:
resident pages, as the OS counts them, not bytes asked of torch's allocator.

With --rounds, each round times every provider once in turn, and the time is the median over
rounds. Prints a table and appends rows to bench/results/hashed_outputs.csv.

    python bench/bench_hashed_outputs.py --shapes amazon lm --active 0.05 0.1 0.25
    python bench/bench_hashed_outputs.py --device cuda --dtype bfloat16 --shapes amazon lm
"""

import contextlib
import ctypes
import gc
import pathlib
import time

import torch
import torch.nn.functional as F

import slicecompile
from slicecompile.tools.bench import CsvFile, Spread, argument_parser, interleave, run_metadata
from slicecompile.tools.timing import median_ms

RESULTS = pathlib.Path(__file__).parent / "results"
FIELDS = "device provider M E N active block fwd_bwd_ms peak_mb dtype bits tables torch timestamp".split()
SHAPES = {"amazon": (256, 128, 670_091), "lm": (2048, 768, 50_304)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def inputs(m, e, n, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(m, e, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, e, device=device) / e**0.5).to(dtype).requires_grad_()
    b = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
    return x, w, b, torch.randint(0, n, (m,), device=device)


def dense_loss(x, w, b, t):
    return F.cross_entropy(F.linear(x, w, b), t)


def providers(device, actives, args):
    """{name: (active or None, loss function of (x, w, b, t))}."""
    found = {"dense": (None, dense_loss)}
    if device.type == "cuda":
        found["dense_inductor"] = (None, torch.compile(dense_loss, backend="inductor"))
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            found["liger"] = (None, lambda x, w, b, t: liger(w, x, t, b))
        except ImportError:
            print("liger: Liger-Kernel is not importable; skipped")
    for active in actives:
        for cached in (False, True):
            codes = slicecompile.WeightCodes() if cached else None
            hashed = lambda x, w, b, t, active=active, codes=codes: slicecompile.hashed_linear_cross_entropy(  # noqa: E731
                x, w, t, b, active=active, block=args.block, bits=args.bits, tables=args.tables, weight_codes=codes
            )
            hashed.weight_codes = codes
            found[f"hashed{'_codes' if cached else ''}@{active}"] = (active, hashed)
        select = lambda x, w, b, t, active=active: slicecompile.select_active_tiles(  # noqa: E731
            x, w, t, active=active, block=args.block, bits=args.bits, tables=args.tables
        )
        found[f"selection@{active}"] = (active, select)
        if device.type == "cuda" and active in args.compiled_active:
            found[f"hashed_inductor@{active}"] = (active, torch.compile(found[f"hashed@{active}"][1]))
    return found


def step_of(loss_fn, x, w, b, t):
    def step():
        result = loss_fn(x, w, b, t)
        if result.requires_grad:
            result.backward()

    return step


def timer(loss_fn, inputs, device, args):
    """A function that times one step of loss_fn on inputs (x, w, b, t): its median wall ms, or
    with a WeightCodes its mean over whole refresh periods."""
    step, (x, w, b, _) = step_of(loss_fn, *inputs), inputs
    codes = getattr(loss_fn, "weight_codes", None)
    if codes is None:
        return lambda: median_ms(step, device, grad_to_none=[x, w, b], rep_ms=args.rep_ms)
    period = codes.period(args.bits, args.tables, x.shape[0])
    return lambda: mean_ms(step, device, [x, w, b], period, args.rep_ms)


def mean_ms(step, device, leaves, period, rep_ms):
    """Mean wall time of a step over whole refresh periods of its WeightCodes (re-hashing steps and
    the others in their proportion), at least rep_ms of them after a warm-up period."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    total, steps = 0.0, 0
    for round_ in range(1 << 30):
        sync()
        start = time.perf_counter()
        for _ in range(period):
            for leaf in leaves:
                leaf.grad = None
            step()
        sync()
        if round_:  # the first period warms up
            total, steps = total + time.perf_counter() - start, steps + period
        if total * 1000 >= rep_ms and steps >= 3:
            return total * 1000 / steps


@contextlib.contextmanager
def cpu_peak():
    """Yields a dict that holds, once the block ends, 'bytes': the resident high-water mark during
    the block above the resident set when it began."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 64 << 10)  # fixed: glibc's own threshold climbs to 32 MiB
    gc.collect()
    libc.malloc_trim(0)
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
    result, before = {}, _status_kib("VmRSS")
    yield result
    result["bytes"] = (_status_kib("VmHWM") - before) * 1024


def _status_kib(key):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_bytes(step, device, leaves):
    for leaf in leaves:
        leaf.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - resting
    with cpu_peak() as peak:
        step()
    return peak["bytes"]


def main():
    parser = argument_parser(__doc__, rounds=1, device="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--shapes", nargs="+", default=["amazon", "lm"], help="amazon, lm or M,E,N")
    parser.add_argument("--active", type=float, nargs="+", default=[0.05])
    parser.add_argument("--block", type=lambda s: tuple(int(v) for v in s.split(",")), default=(64, 128))
    parser.add_argument("--compiled-active", type=float, nargs="*", default=[0.1], help="CUDA: compile the op here")
    parser.add_argument("--bits", type=int, default=12)
    parser.add_argument("--tables", type=int, default=4)
    parser.add_argument("--rep-ms", type=float, default=2000, help="time each provider for at least this long")
    parser.add_argument("--providers", nargs="*", help="names to run (default: all)")
    parser.add_argument("--csv", default="hashed_outputs.csv")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    meta = run_metadata(args.device)
    meta["device"] = meta.pop("gpu")
    out = CsvFile(RESULTS / args.csv, FIELDS, meta)
    for shape in args.shapes:
        m, e, n = SHAPES[shape] if shape in SHAPES else tuple(int(v) for v in shape.split(","))
        hashing = f"block {args.block}, {args.bits} bits x {args.tables}"
        print(f"\n{meta['device']}, {args.dtype}: M {m}, E {e}, N {n}, {hashing}")
        run_shape(inputs(m, e, n, DTYPES[args.dtype], args.device), args, out)


def run_shape(tensors, args, out):
    """Times every chosen provider at one shape, the providers interleaved, then measures each one's
    peak memory; prints and appends its row as soon as its last round ends."""
    x, w, b, _ = tensors
    (m, e), n = x.shape, w.shape[0]
    chosen = {
        provider: (active, loss_fn)
        for provider, (active, loss_fn) in providers(args.device, args.active, args).items()
        if not args.providers or provider in args.providers or provider.split("@")[0] in args.providers
    }
    base = None

    def report(provider, times):
        nonlocal base
        active, loss_fn = chosen[provider]
        ms = Spread.of(times)
        peak_mb = peak_bytes(step_of(loss_fn, *tensors), args.device, [x, w, b]) / 2**20
        base = base or ((ms.median, peak_mb) if provider == "dense" else None)
        speed = f"{base[0] / ms.median:.2f}x faster" if base else "-"
        memory = f"{peak_mb / base[1]:.3f}x" if base else "-"
        rounds = f"  rounds {ms}" if args.rounds > 1 else ""
        print(f"{provider:<16}{ms.median:>12.1f}{peak_mb:>10.1f}{speed:>15}{memory:>17}{rounds}", flush=True)
        row = dict(provider=provider.split("@")[0], M=m, E=e, N=n, active=active or "")
        row |= dict(block="x".join(map(str, args.block)), fwd_bwd_ms=f"{ms.median:.2f}", peak_mb=f"{peak_mb:.1f}")
        out.append(row | dict(dtype=args.dtype, bits=args.bits, tables=args.tables))

    print(f"{'provider':<16}{'fwd+bwd ms':>12}{'peak MiB':>10}{'time vs dense':>15}{'memory vs dense':>17}")
    timers = {provider: timer(loss_fn, tensors, args.device, args) for provider, (_, loss_fn) in chosen.items()}
    interleave(timers, args.rounds, done=report)


if __name__ == "__main__":
    main()
