"""Attention with dropout: slicecompile's block-dropout attention against SDPA and Inductor.

Providers: sdpa (F.scaled_dot_product_attention without dropout: the target at p = 0.1),
sdpa_dropout (the same with dropout_p = p: FlashAttention-class dropout, a random number per
element), eager_inductor (softmax(q kᵀ · scale) → F.dropout → @ v under torch.compile, which
fuses the dropout into the softmax but writes the L×L probabilities), slicecompile
(slicecompile.dropout_attention, eager), slicecompile_inductor (the same under torch.compile),
slicecompile_sdpa (SDPA with dropout_p = p under backend="slicecompile", rewrite="always"), and
slicecompile_dropkey, _dropkey_inductor, _dropkey_sdpa: the same three under policy="dropkey"
(backend option attention="dropkey"): dropped tiles are hidden before the softmax.

Variants run our providers under the kernels' environment switches: default, tma
(SLICECOMPILE_ATTENTION_TMA=1: q, k, v read through tensor descriptors) and tma_ws (also
SLICECOMPILE_ATTENTION_WS=1: warp-specialised key loops). Each variant is first checked against
the dense reference under one explicit mask; a variant that fails is not timed.

Modes: fwd, bwd (backward alone, the graph kept), full (forward + backward, wall time),
fwd_kernels and full_kernels (summed GPU kernel time of one forward without grad, or of one
forward + backward, from torch.profiler; nan on a CPU). Every round times every provider once
per mode, providers interleaved; the table shows the median over rounds ± half the min–max range,
the closing summary each variant's ratio to sdpa and sdpa_dropout. --rounds 0 runs the checks only.
Configurations run p by p, then causal, then shape; --budget-s stops starting new ones.

    python bench/bench_attention.py --shapes 8,12,1024,64 4,16,2048,128 --p 0.1 0.5 --causal 0 1
    python bench/bench_attention.py --device cpu    # smoke run; with TRITON_INTERPRET=1 our kernels run too
"""

import argparse
import collections
import contextlib
import csv
import datetime
import functools
import inspect
import math
import os
import pathlib
import platform
import statistics
import tempfile
import time
import types

import torch
import torch.nn.functional as F
import triton

import slicecompile
import slicecompile.kernels
from slicecompile.tools.timing import kernel_ms, median_ms

RESULTS = pathlib.Path(__file__).parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The first fifteen are results/attention.csv's header; rows with the later ones go to another file.
FIELDS = "gpu dtype B H L E causal p block provider mode ms torch triton timestamp".split()
FIELDS += ["round", "variant", "kv_heads", "autotune", "check"]
# A measurement (mode fwd ... full_kernels), a variant's check (ms: its relative error) or a provider
# that did not build (mode "build"); check: "ok", "wrong" or "failed" ("" for a baseline's timings).
Row = collections.namedtuple("Row", "provider variant round mode ms check")
MODES = ("fwd", "bwd", "full", "fwd_kernels", "full_kernels")
BASELINES = ("sdpa", "sdpa_dropout", "eager_inductor")
OURS = tuple(f"slicecompile{policy}{twin}" for policy in ("", "_dropkey") for twin in ("", "_inductor", "_sdpa"))
VARIANTS = {
    "default": {"SLICECOMPILE_ATTENTION_TMA": "0", "SLICECOMPILE_ATTENTION_WS": "0"},
    "tma": {"SLICECOMPILE_ATTENTION_TMA": "1", "SLICECOMPILE_ATTENTION_WS": "0"},
    "tma_ws": {"SLICECOMPILE_ATTENTION_TMA": "1", "SLICECOMPILE_ATTENTION_WS": "1"},
}
# Defaults by device: a CPU run is a smoke test of this script (two configurations, every provider
# and mode; 12-20 s once Inductor's caches are warm, 55 s cold on two cores), a GPU run the benchmark.
SMOKE = dict(shapes=["1,2,128,64", "1,2,128,32"], p=[0.5], causal=[1], block="64,64", rounds=2, rep_ms=1)
GPU = dict(shapes=["8,12,1024,64", "4,16,2048,128", "16,12,512,64"], p=[0.1, 0.5], causal=[0, 1], block="128,128")
GPU |= dict(rounds=3, rep_ms=100)


def eager_attention(q, k, v, p, causal):
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        length = q.shape[-2]
        keep = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return F.dropout(scores.softmax(dim=-1), p) @ v


def fresh(fn):
    """fn with a code object of its own. Dynamo keeps compiled code per code object, so each
    variant's compiled twin is traced (and its kernels chosen) under that variant's environment,
    and the variants' twins can then run side by side in one round."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def provider(name, q, k, v, p, causal, block):
    """A callable running one forward of provider `name` (a compiled one compiles when first called)."""
    gqa, dropkey = k.shape[1] != q.shape[1], "_dropkey" in name
    if name == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal, enable_gqa=gqa)
    if name == "sdpa_dropout":
        return sdpa
    if name == "eager_inductor":
        return torch.compile(fresh(lambda: eager_attention(q, k, v, p, causal)))
    if name.endswith("_sdpa"):
        options = {"block": block, "min_gemm_size": 0, "rewrite": "always"} | (
            {"attention": "dropkey"} if dropkey else {}
        )
        return torch.compile(fresh(sdpa), backend="slicecompile", options=options)
    policy = {"policy": "dropkey"} if dropkey else {}
    ours = lambda: slicecompile.dropout_attention(
        q, k, v, dropout_p=p, is_causal=causal, enable_gqa=gqa, block=block, **policy
    )
    return torch.compile(fresh(ours)) if name.endswith("_inductor") else ours


@contextlib.contextmanager
def variant_env(variant):
    """The kernels read these when they launch (and, under torch.compile, when they are traced)."""
    saved = {key: os.environ.get(key) for key in VARIANTS["default"]}
    os.environ.update(VARIANTS.get(variant, {}))
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def check(q, k, v, p, causal, block, policy):
    """(our relative error, PyTorch's own in the same dtype): the op's output and q, k, v
    gradients under one explicit mask, drawn as the op draws it, against the reference in a wider
    dtype, batch 1; the largest of the four ‖ours − exact‖ / ‖exact‖."""
    q, k, v = (t[:1].detach() for t in (q, k, v))
    drawn = {} if policy == "dropout" else dict(policy=policy, is_causal=causal)
    mask = slicecompile.draw_attention_mask(1, q.shape[1], q.shape[2], k.shape[2], p, block, device=q.device, **drawn)
    grad = torch.randn(*q.shape[:3], v.shape[3], device=q.device, dtype=q.dtype)
    wide = torch.float64 if q.dtype == torch.float32 else torch.float32
    gqa = k.shape[1] != q.shape[1]

    def run(op, dtype):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = op(*leaves, mask, is_causal=causal, enable_gqa=gqa)
        out.backward(grad.to(dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    exact = run(slicecompile.dropout_attention_reference, wide)

    def error(results):
        return max(((r.to(wide) - e).norm() / e.norm().clamp_min(1e-30)).item() for r, e in zip(results, exact))

    ours = error(run(slicecompile.dropout_attention_with_mask, q.dtype))
    return ours, error(run(slicecompile.dropout_attention_reference, q.dtype))


def time_modes(fn, modes, leaves, grad, device, rep_ms):
    """{mode: ms} of one forward fn (see the module's docstring); on a CPU each median is of as
    many calls as fit in rep_ms, at least one, and the GPU-time modes are nan."""
    median = functools.partial(median_ms, device=device, rep_ms=rep_ms, min_samples=1)

    def forward():
        with torch.no_grad():
            return fn()

    step = lambda: fn().backward(grad)
    times = {}
    for mode in modes:
        if mode == "fwd":
            times[mode] = median(forward)
        elif mode == "bwd":
            times[mode] = median(functools.partial(fn().backward, grad, retain_graph=True), grad_to_none=leaves)
        elif mode == "full":
            times[mode] = median(step, grad_to_none=leaves)
        elif device != "cuda":
            times[mode] = math.nan  # torch.profiler's CUDA time
        else:
            times[mode] = kernel_ms(forward) if mode == "fwd_kernels" else kernel_ms(step, leaves)
    return times


def checked_variants(q, k, v, p, causal, block, variants, policies, say):
    """(check rows, [(provider, variant)] to time): each variant's kernels under each policy
    against the reference; a variant's providers under a policy are timed only if it passed."""
    rows, timed = [], []
    for variant in variants:
        with variant_env(variant):
            for policy, names in policies.items():
                try:
                    ours, theirs = check(q, k, v, p, causal, block, policy)
                    verdict = "ok" if ours <= 2 * theirs + torch.finfo(q.dtype).eps else "wrong"  # NaN is wrong
                    say(f"  check {variant:>8} {policy:>8}: {ours:.2e} against torch's own {theirs:.2e}: {verdict}")
                except Exception as error:  # a kernel that fails to compile or launch
                    ours, verdict = math.nan, "failed"
                    say(f"  check {variant:>8} {policy:>8}: failed: {brief(error)}")
                checked = "slicecompile_dropkey" if policy == "dropkey" else "slicecompile"  # the eager op
                rows.append(Row(checked, variant, "", "check", ours, verdict))
                timed += [(name, variant) for name in names if verdict == "ok"]
    return rows, timed


def warmed_up(entries, build, grad, say):
    """([(provider, variant, fn)] for the entries that build, compile (with and without grad) and
    tune, [a "build" row for each of the others])."""
    ready, failed = [], []
    for name, variant in entries:
        with variant_env(variant):
            try:
                fn = build(name)
                with torch.no_grad():
                    fn()
                fn().backward(grad)
                ready.append((name, variant, fn))
            except Exception as error:
                say(f"  skipped {name} {variant or ''}: {brief(error)}")
                failed.append(Row(name, variant, "", "build", math.nan, "failed"))
    return ready, failed


def brief(error):
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


def run_config(args, dims, causal, p, policies, say):
    """Rows (provider, variant, round, mode, ms, check) of one configuration: the variants'
    checks, then args.rounds rounds over every provider that passed, built and warmed up."""
    torch._dynamo.reset()  # each configuration compiles afresh instead of hitting the recompile limit
    B, H, L, E = dims
    device, dtype = args.device, DTYPES[args.dtype]
    q = torch.randn(B, H, L, E, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, args.kv_heads or H, L, E, device=device, dtype=dtype, requires_grad=True) for _ in "kv")
    grad = torch.randn(B, H, L, E, device=device, dtype=dtype)
    clock = [time.perf_counter()]
    rows, ours = checked_variants(q, k, v, p, causal, args.block, args.variants, policies, say)
    clock.append(time.perf_counter())
    if not args.rounds:  # checks only
        return rows
    baselines = [(name, "") for name in args.providers if name in BASELINES]
    build = lambda name: provider(name, q, k, v, p, causal, args.block)
    entries, failed = warmed_up(baselines + ours, build, grad, say)
    rows += failed
    clock.append(time.perf_counter())
    for round_ in range(args.rounds):
        for name, variant, fn in entries:
            with variant_env(variant):
                times = time_modes(fn, args.modes, [q, k, v], grad, device, args.rep_ms)
            rows += [Row(name, variant, round_, mode, ms, "ok" if variant else "") for mode, ms in times.items()]
    clock.append(time.perf_counter())
    phases = (f"{b - a:.1f} s {what}" for a, b, what in zip(clock, clock[1:], ("checking", "compiling", "timing")))
    say(f"  ({', '.join(phases)})")
    return rows


def spread(values):
    """'median ±h%': h half the min–max range over rounds, in percent of the median."""
    values = [x for x in values if not math.isnan(x)]
    if not values:
        return "-"
    mid = statistics.median(values)
    return f"{mid:.3f} ±{50 * (max(values) - min(values)) / mid:.1f}%" if mid else f"{mid:.3f}"


def medians(rows, mode):
    by = {}
    for r in rows:
        if r.mode == mode and not math.isnan(r.ms):
            by.setdefault((r.provider, r.variant), []).append(r.ms)
    return {key: statistics.median(values) for key, values in by.items()}


def print_config(rows, modes, label, say):
    say(f"{'':>24} {'provider':>30} {'variant':>8}" + "".join(f" {mode:>16}" for mode in modes))
    entries = dict.fromkeys((r.provider, r.variant) for r in rows if r.mode in MODES)
    for name, variant in entries:
        cells = [spread([r.ms for r in rows if r[:2] == (name, variant) and r.mode == mode]) for mode in modes]
        say(f"{label:>24} {name:>30} {variant or '-':>8}" + "".join(f" {cell:>16}" for cell in cells))


def print_summary(results, variants, say):
    """Per configuration and provider of ours, each variant's median ms and its ratios to sdpa and
    to sdpa_dropout, in the first of full_kernels, fwd_kernels, full, fwd, bwd that was timed; then
    what was not timed and why."""
    timed = {r.mode for _, rows in results for r in rows if not math.isnan(r.ms)}
    mode = next((m for m in ("full_kernels", "fwd_kernels", "full", "fwd", "bwd") if m in timed), None)
    if mode:
        say(f"\nSummary: {mode}, median ms; per variant: ms, ours / sdpa, ours / sdpa_dropout (below 1: ours faster)")
        say(f"{'':>23} {'sdpa':>6} {'sdpa_dr':>7} {'provider':>29}" + "".join(f" {v:>18}" for v in variants))
    ratio = lambda a, b: a / b if b else math.nan
    for label, rows in results:
        ms = medians(rows, mode) if mode else {}
        base = [ms.get((name, ""), math.nan) for name in ("sdpa", "sdpa_dropout")]
        for name in dict.fromkeys(name for name, variant in ms if variant):
            cells = [ms.get((name, v)) for v in variants]
            cells = ["-" if t is None else f"{t:.3f} {ratio(t, base[0]):.2f} {ratio(t, base[1]):.2f}" for t in cells]
            say(f"{label:>23} {base[0]:>6.3f} {base[1]:>7.3f} {name:>29}" + "".join(f" {c:>18}" for c in cells))
    for label, rows in results:
        for r in rows:
            if r.mode == "check" and r.check != "ok":
                say(f"{label:>23} {r.variant}: {r.provider}'s check {r.check} (error {r.ms:.2e}); not timed")
            elif r.mode == "build":
                say(f"{label:>23} {r.variant or '-'}: {r.provider} did not build or run; not timed")
    checks = [r.check for _, rows in results for r in rows if r.mode == "check"]
    say(f"{checks.count('ok')} of {len(checks)} checks ok, {len(results)} configurations")


def csv_paths(args):
    """Where rows go: each --csv path (a bare file name goes to the device's directory: results/ on
    a GPU, $OUT or the temporary directory for a CPU smoke run, which never writes to results/).
    A file that exists must have this script's header."""
    home = RESULTS if args.device == "cuda" else pathlib.Path(os.environ.get("OUT") or tempfile.gettempdir())
    paths = [home / name if pathlib.Path(name).name == name else pathlib.Path(name) for name in args.csv]
    paths = list({path.resolve(): path for path in paths}.values())  # $OUT may be results/ itself
    for path in paths:
        if args.device != "cuda" and path.resolve().is_relative_to(RESULTS.resolve()):
            raise SystemExit(f"{path}: a {args.device} smoke run does not write to {RESULTS}; pass --csv elsewhere")
        if path.exists() and path.stat().st_size and csv_header(path) != FIELDS:
            raise SystemExit(f"{path} has another header; its rows stay as they are: pass another --csv")
    return paths


def csv_header(path):
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


def arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shapes", nargs="+", help=f"B,H,L,E (default {GPU['shapes']}; CPU {SMOKE['shapes']})")
    parser.add_argument("--kv-heads", type=int, help="k and v heads (grouped-query attention); default H")
    parser.add_argument("--p", type=float, nargs="+", help=f"default {GPU['p']}; CPU {SMOKE['p']}")
    parser.add_argument(
        "--causal", type=int, nargs="+", choices=[0, 1], help=f"default {GPU['causal']}; CPU {SMOKE['causal']}"
    )
    parser.add_argument("--block", help=f"BM,BN: the dropped tile (default {GPU['block']}; CPU {SMOKE['block']})")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    listed = lambda names: dict(nargs="+", choices=names, metavar="NAME", help=", ".join(names))
    parser.add_argument("--providers", **listed(BASELINES + OURS), default=list(BASELINES + OURS))
    parser.add_argument("--variants", **listed(tuple(VARIANTS)), default=["default"])
    parser.add_argument("--modes", **listed(MODES), default=list(MODES))
    parser.add_argument("--rounds", type=int, help=f"default {GPU['rounds']}; CPU {SMOKE['rounds']}; 0: checks only")
    parser.add_argument("--rep-ms", type=int, help=f"ms per median (default {GPU['rep_ms']}; CPU {SMOKE['rep_ms']})")
    parser.add_argument("--autotune", choices=("0", "1"), help="sets SLICECOMPILE_AUTOTUNE (0: first config, untuned)")
    parser.add_argument("--budget-s", type=float, help="start no configuration that would end past this many seconds")
    parser.add_argument("--csv", nargs="+", default=["attention_variants.csv"], help="where rows go (see csv_paths)")
    args = parser.parse_args()
    for key, value in (SMOKE if args.device == "cpu" else GPU).items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.dims = [tuple(map(int, shape.split(","))) for shape in args.shapes]
    bad = [dims for dims in args.dims if len(dims) != 4 or args.kv_heads and dims[1] % args.kv_heads]
    if bad or args.rounds < 0:
        parser.error(f"shapes are B,H,L,E with H a multiple of --kv-heads, rounds >= 0; got {bad or args.rounds}")
    args.block = tuple(map(int, args.block.split(",")))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --device cpu for a smoke run")
    return args


def policies_to_check(args, say):
    """{policy: our providers under it} for the providers asked for that this slicecompile has."""
    wanted = {
        "dropout": [n for n in args.providers if n in OURS[:3]],
        "dropkey": [n for n in args.providers if n in OURS[3:]],
    }
    takes = {*inspect.signature(slicecompile.dropout_attention).parameters}
    takes &= {*inspect.signature(slicecompile.draw_attention_mask).parameters}
    if wanted["dropkey"] and not {"policy", "is_causal"} <= takes:
        say(f"note: this slicecompile has no policy= argument; skipped {', '.join(wanted['dropkey'])}")
        wanted["dropkey"] = []
    return {policy: names for policy, names in wanted.items() if names}


def variants_known(args, say):
    """The variants whose switches the installed package reads: one it ignores would time the
    default kernels under another name."""
    folders = {pathlib.Path(m.__file__).parent for m in (slicecompile, slicecompile.kernels)}
    source = "".join(path.read_text() for folder in folders for path in folder.rglob("*.py"))
    known = [v for v in args.variants if all(key in source for key, on in VARIANTS[v].items() if on == "1")]
    for variant in set(args.variants) - set(known):
        say(f"note: the installed kernels do not read {' and '.join(VARIANTS[variant])}; skipped variant {variant}")
    return known


def run_metadata(args):
    """What every row carries besides its measurement."""
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    cpu = f"cpu {platform.machine()}" + (" (triton interpreter)" if interpreter else "")
    return dict(
        gpu=torch.cuda.get_device_name() if args.device == "cuda" else cpu,
        dtype=args.dtype,
        block=",".join(map(str, args.block)),
        torch=torch.__version__,
        triton=triton.__version__,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        autotune=os.environ.get("SLICECOMPILE_AUTOTUNE", "1"),
    )


def main():
    args = arguments()
    paths = csv_paths(args)
    say = lambda line="": print(line, flush=True)
    args.variants = variants_known(args, say)
    policies = policies_to_check(args, say)
    if args.autotune:
        os.environ["SLICECOMPILE_AUTOTUNE"] = args.autotune
    if args.device == "cpu":
        torch.set_num_threads(1)  # a smoke run times nothing worth two threads waiting on a busy machine
    else:
        # Variants differ only in what the op reads from the environment while it is traced, which
        # the compiled-artefact caches do not see: a hit would time one variant's kernels as another's.
        # (A CPU run compiles the reference, the same under every variant, and keeps its caches.)
        torch._functorch.config.enable_autograd_cache = False
        torch._inductor.config.fx_graph_cache = False
    # bwd repeats one backward over a kept graph, which a compiled backward's donated buffers forbid.
    torch._functorch.config.donated_buffer = "bwd" not in args.modes
    meta = run_metadata(args)
    say(f"{meta['gpu']}, {args.dtype}, torch {meta['torch']}, triton {meta['triton']}, autotune {meta['autotune']}")
    rounds = f"{args.rounds} rounds; median ms ± half the min–max range" if args.rounds else "checks only"
    say(f"{rounds}; CSV: {', '.join(map(str, paths))}")
    with contextlib.ExitStack() as stack:
        appenders = [csv_appender(stack, path) for path in paths]
        results = run_all(args, policies, meta, appenders, say)
    print_summary(results, args.variants, say)
    problems = [r for _, rows in results for r in rows if r.check in ("wrong", "failed")]
    if problems or len(results) < len(args.p) * len(args.causal) * len(args.dims):
        raise SystemExit(f"{len(problems)} checks or providers failed, {len(results)} configurations run")


def csv_appender(stack, path):
    """A function that appends a row to path (after the header, if the file is new) and flushes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = stack.enter_context(open(path, "a", newline=""))
    writer = csv.DictWriter(f, FIELDS)
    if not f.tell():
        writer.writeheader()
    return lambda row: (writer.writerow(row), f.flush())


def run_all(args, policies, meta, appenders, say):
    """[(label, rows)] of each configuration run, p by p, then causal, then shape; rows are written
    as each configuration ends. Stops at the budget, or at a configuration that fails."""
    configs = [(p, causal, dims) for p in args.p for causal in map(bool, args.causal) for dims in args.dims]
    start, longest, results = time.perf_counter(), 0.0, []
    for n, (p, causal, dims) in enumerate(configs):
        elapsed = time.perf_counter() - start
        if args.budget_s and elapsed + longest > args.budget_s:
            say(f"budget of {args.budget_s:.0f} s reached after {elapsed:.0f} s: {len(configs) - n} configs not run")
            break
        label = f"{','.join(map(str, dims))}{'/' + str(args.kv_heads) if args.kv_heads else ''} c{int(causal)} p{p}"
        say(f"[{n + 1}/{len(configs)}] {label}")
        try:
            rows = run_config(args, dims, causal, p, policies, say)
        except Exception as error:  # a faulting kernel can leave the CUDA context unusable: stop here
            say(f"  failed: {brief(error)}; {len(configs) - n - 1} configs not run")
            break
        if args.rounds:
            print_config(rows, args.modes, label, say)
        results.append((label, rows))
        sizes = dict(zip("BHLE", dims), kv_heads=args.kv_heads or dims[1], causal=int(causal), p=p)
        for row in rows:
            for append in appenders:
                append(meta | sizes | row._asdict() | dict(ms=f"{row.ms:.4f}"))
        longest = max(longest, time.perf_counter() - start - elapsed)
    return results


if __name__ == "__main__":
    main()
