"""options={"rewrite": "auto"}, the default: on a GPU, a site is rewritten only where our op,
timed at the site's shapes, dtype, p and block, is faster than what Inductor cannot avoid running
for it.

Inductor's part is the dense computation alone: F.linear (its three cuBLAS GEMMs), F.conv2d or
F.scaled_dot_product_attention with the same dropout_p, forward and backward. Inductor fuses an
element-wise dropout's mask into the kernels around it, so what the dropout itself costs depends
on the whole graph; leaving it out makes the comparison one-sided in Inductor's favour, and a
site is rewritten only where it wins even so (by MARGIN, more than the timings' noise). Each
side costs its kernels' GPU time (the profiler's), or where longer, the host's time to launch
them in a compiled graph: a launch-bound op pays for its launches. The op is timed eagerly (a
compile cannot run inside the backend's own), so its launches are counted as a compiled graph
would make them: our Triton kernels one each, and the many small kernels of the torch code
around them (drawing the mask, its tile index) as the few that Inductor fuses them into.

Measured, not modelled: the op's speed depends on the GPU, the Triton version and the autotuner's
choice at the exact shape (a 768-wide weight gradient is 36 output tiles for 132 multiprocessors),
which a cost model would have to be re-calibrated for on every GPU. The timing costs one to
two seconds per new site shape, at its first compile, and is cached on disk per GPU, torch and Triton
version and copy of slicecompile's sources (SLICECOMPILE_CACHE_DIR, by default
~/.cache/slicecompile), so later processes read it.

On a CPU the rewrite stays as "always": there it exists to run the semantics, through Triton's
interpreter. "always" rewrites every site the pass can take.

Sites whose rewrite changes the model beyond the block structure are not timed: a loss over
hashed outputs (hashed_outputs) and attention under attention="dropkey". The user opted into that
objective or regulariser; leaving such a site to Inductor would train another model (the full
loss, element dropout after the softmax), and differently on each GPU and shape. "Never slower by
default" holds: both are opt-in. A site the pass cannot take stays as it was, with its reason.
"""

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton

from ..kernels import kernel_names
from ..ops import dropout_attention, dropout_conv2d, dropout_linear, linear_dropout, slice_dropout_linear
from .cache_key import sources_key
from .patterns import hint, meta_value

log = logging.getLogger("slicecompile")

MODES = ("auto", "always")
TIMED_DEVICES = frozenset({"cuda"})
MARGIN = 0.95  # ours must take at most this share of Inductor's time
# Host time per kernel launch in a compiled step, from a torch.profiler table of the compiled op
# on an H200 (bench/README.md): 51-61 us for ours, 14-24 us for Inductor's own kernels.
OUR_LAUNCH_MS, INDUCTOR_LAUNCH_MS = 0.056, 0.019
# The most kernels Inductor makes of the torch code around our kernels in one site's forward and
# backward: 7 for dropout_linear in Inductor's code for a compiled step on an H100 (3 draw the
# mask, 4 make its tile table, column index and slots), where the eager op launches about 30.
FUSED_LAUNCHES = 7
SLOWER = "measured no faster than Inductor"
UNTIMED = "could not be timed"


@dataclass(frozen=True)
class Workload:
    """What is timed for a site: kind ("linear", "slice", "output", "conv", "attention"), its
    shapes (per kind: see _calls), dtype, p, and settings (the block; a conv's policy and
    sample groups; attention's causal flag)."""

    kind: str
    shapes: tuple
    dtype: str
    p: float
    settings: tuple

    def key(self):
        return json.dumps(asdict(self))


def workload(site, options):
    """The Workload of a site the pass would rewrite under options."""
    block = options.block
    dtype = str(site.matches[0][1].dtype or meta_value(site.node.args[0]).dtype).replace("torch.", "")
    if site.side == "attention":
        match = site.matches[0][1]
        (rows, head_dim, keys), (_, _, value_dim) = match.gemms
        queries = _queries(site, match)
        shapes = (rows // max(queries, 1), queries, keys, head_dim, value_dim, match.masked)
        return Workload("attention", shapes, dtype, site.p, (tuple(block), bool(match.is_causal)))
    if site.side == "output":
        return Workload("output", _linear_shapes(site), dtype, site.p, (tuple(block),))
    match = site.matches[0][1]
    if match.conv is not None:
        x = tuple(hint(size) for size in meta_value(site.node.args[0]).shape)
        weight = tuple(hint(size) for size in meta_value(match.weight).shape)
        settings = (site.policy, options.samples_per_group, *match.conv)
        return Workload("conv", (x, weight, match.bias is not None), dtype, site.p, settings)
    kind = "slice" if site.policy == "slice" else "linear"
    return Workload(kind, _linear_shapes(site), dtype, site.p, (tuple(block),))


def _linear_shapes(site):
    return tuple((*match.gemm, match.bias is not None) for _, match in site.matches)


def _queries(site, match):
    q = meta_value(match.q)
    return hint(q.shape[0] if match.key_t is None else q.shape[-2])  # multi-head attention: (L, N, E)


def judge(sites, options):
    """Under rewrite="auto", time each site the pass would rewrite on a timed device, record
    (ours, Inductor's) milliseconds in site.timing, and skip those not faster by MARGIN."""
    if options.rewrite != "auto":
        return sites
    for site in sites:
        if not site.rewritten or site.device not in TIMED_DEVICES or _chosen_model(site):
            continue
        try:
            site.timing = measure(workload(site, options))
        except Exception as error:
            log.warning("slicecompile: timing dropout %s failed; it stays as it was", site.name, exc_info=True)
            site.rewritten, site.matches = False, []
            site.reason = f"{UNTIMED}: {type(error).__name__}: {error}"
            continue
        ours, inductor = site.timing
        if ours > MARGIN * inductor:
            site.rewritten, site.matches = False, []
            site.reason = f"{SLOWER} ({ours:.3g} ms against {inductor:.3g} ms forward+backward)"
    return sites


def _chosen_model(site):
    """A loss over hashed outputs, or DropKey attention: a model the user asked for, not a speed-up."""
    return site.side == "loss" or site.policy == "dropkey"


_MEASURED = {}  # Workload.key() -> (ours ms, Inductor's ms), this process's and the disk's


def measure(work):
    """(our op's, the dense computation's) forward+backward cost in ms at work's sizes on the
    current GPU (time_workload), from this process's cache, the disk's, or timed now."""
    path = _cache_path()
    if not _MEASURED.get(path):
        _MEASURED[path] = _read(path)
    cache = _MEASURED[path]
    key = work.key()
    if key not in cache:
        cache[key] = time_workload(work)
        _write(path, cache)
    return tuple(cache[key])


def time_workload(work, device="cuda"):
    """(ours, dense): what a forward+backward of each costs a compiled training step, in ms."""
    with torch._subclasses.fake_tensor.unset_fake_temporarily(), torch.enable_grad():
        ours, dense = _calls(work, torch.device(device))
        return _cost(ours, ours=True), _cost(dense, ours=False)


def _cost(fn, ours):
    """The GPU time of fn's kernels, or the host's time to launch them under torch.compile where
    that is longer (the GPU then waits for the host)."""
    if not torch.cuda.is_available():
        fn()  # on a CPU (the tests): one run, as a check that it runs
        return 1.0
    fn()  # compiles and tunes the kernels
    torch.cuda.synchronize()
    gpu_ms, names = _kernels(fn)
    return max(gpu_ms, host_ms(names, ours))


def host_ms(names, ours):
    """The host's time to launch, in a compiled graph, what an eager call launched (the kernels'
    names, one per launch): for our op, our kernels at OUR_LAUNCH_MS each and the rest as at most
    FUSED_LAUNCHES of Inductor's; for the dense side, every kernel as one of Inductor's."""
    if not ours:
        return len(names) * INDUCTOR_LAUNCH_MS
    own = sum(name.startswith(kernel_names()) for name in names)
    return own * OUR_LAUNCH_MS + min(len(names) - own, FUSED_LAUNCHES) * INDUCTOR_LAUNCH_MS


def _kernels(fn, calls=5):
    """(GPU ms per call of fn, the names of the kernels one call launched), from the profiler's
    GPU activity. Eager calls cost the host far more than a compiled graph's launches do
    (2.2-3 ms against 0.2 ms of GPU work for a small site on an H100), so wall time would
    misjudge what the compiled step pays."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    gpu = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    if not gpu:  # another profiler running, say: no timing rather than a cost of zero
        raise RuntimeError("the profiler recorded no GPU activity")
    per_call = [event.name for event in gpu[: len(gpu) // calls]]
    return sum(event.time_range.elapsed_us() for event in gpu) / 1000 / calls, per_call


def _calls(work, device):
    """(ours, dense): forward+backward calls on random inputs of work's sizes."""
    dtype = getattr(torch, work.dtype)
    make = lambda *shape, scale=1.0: (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_()
    if work.kind == "attention":
        planes, queries, keys, head_dim, value_dim, masked = work.shapes
        block, causal = work.settings
        # 4-D, as SDPA's flash and memory-efficient kernels take it
        q, k, v = make(1, planes, queries, head_dim), make(1, planes, keys, head_dim), make(1, planes, keys, value_dim)
        mask = torch.zeros(queries, keys, device=device, dtype=dtype) if masked else None
        ours = lambda: dropout_attention(q, k, v, mask, work.p, causal, None, False, block)
        dense = lambda: F.scaled_dot_product_attention(q, k, v, mask, work.p, causal)
        return _backward(ours, [q, k, v]), _backward(dense, [q, k, v])
    if work.kind == "conv":
        x_shape, w_shape, has_bias = work.shapes
        policy, samples_per_group, *conv = work.settings
        x, w = make(*x_shape), make(*w_shape, scale=w_shape[1] ** -0.5)
        b = make(w_shape[0]) if has_bias else None
        leaves = [t for t in (x, w, b) if t is not None]
        ours = lambda: dropout_conv2d(x, w, b, *conv, p=work.p, policy=policy, samples_per_group=samples_per_group)
        return _backward(ours, leaves), _backward(lambda: F.conv2d(x, w, b, *conv), leaves)
    op = {"linear": dropout_linear, "slice": slice_dropout_linear, "output": linear_dropout}[work.kind]
    layers = [(make(m, k), make(n, k, scale=k**-0.5), make(n) if bias else None) for m, k, n, bias in work.shapes]
    block = {} if work.kind == "slice" else {"block": work.settings[0]}
    leaves = [[t for t in layer if t is not None] for layer in layers]
    ours = [
        _backward(lambda x=x, w=w, b=b: op(x, w, b, p=work.p, **block), ts) for (x, w, b), ts in zip(layers, leaves)
    ]
    dense = [_backward(lambda x=x, w=w, b=b: F.linear(x, w, b), ts) for (x, w, b), ts in zip(layers, leaves)]
    return lambda: [fn() for fn in ours], lambda: [fn() for fn in dense]


def _backward(forward, leaves):
    """forward's output's gradients for the leaves (not accumulated into .grad)."""

    def step():
        out = forward()
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return step


def _cache_path():
    """One file per GPU, torch and Triton version, and copy of slicecompile's sources (an edit to
    an op or a kernel changes its speed)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    versions = f"{name}-torch{torch.__version__}-triton{triton.__version__}-{sources_key()}"
    directory = os.environ.get("SLICECOMPILE_CACHE_DIR") or os.path.expanduser("~/.cache/slicecompile")
    return os.path.join(directory, "timings-" + "".join(c if c.isalnum() or c in ".+-" else "_" for c in versions))


def _read(path):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def _write(path, cache):
    """Atomically, so that processes compiling at once never read half a file; a cache that
    cannot be written only costs a re-timing."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as file:
            json.dump(cache, file)
        os.replace(file.name, path)
    except OSError as error:
        log.info("slicecompile: could not write the timing cache %s: %s", path, error)
