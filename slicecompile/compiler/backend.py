"""The torch.compile backend: `torch.compile(model, backend="slicecompile", options={...})`.

Dynamo hands us each FX graph; we rewrite the dropout → matmul sites on a copy (sites.py
decides, rewrite.py applies), then hand the graph to Inductor exactly as backend="inductor"
would, with `mode=` and Inductor options passed through. Anything that goes wrong in the
rewrite compiles the original graph instead: a training run never dies because of us.

Registered by the `torch_dynamo_backends` entry point (pyproject.toml), never with
@register_backend as well: Dynamo raises "duplicate name" when both are present.
"""

import logging
from dataclasses import replace

import torch
import torch._guards
import torch._inductor.config
from torch._dynamo.exc import RestartAnalysis, SkipFrame
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import ddp
from .cache_key import SourcesKey
from .graphs import copy_graph, restart_with_constant_p
from .options import disabled_by_env, parse_options
from .rewrite import rewrite
from .sites import find_sites

log = logging.getLogger("slicecompile")
try:  # makes TORCH_LOGS="+slicecompile" reach our logger; a private torch API, so optional
    torch._logging._internal.register_log("slicecompile", "slicecompile")
except Exception:  # pragma: no cover
    pass

# Exceptions by which Dynamo and AOTAutograd steer compilation (e.g. "retrace with this float
# constant"): never mistaken for a failed rewrite.
DYNAMO_CONTROL_FLOW = (RestartAnalysis, SkipFrame)


def _inductor(gm, example_inputs, mode, inductor_options):
    """compile_fx as backend="inductor" calls it: torch's own wrapper turns mode= and
    options= into Inductor config patches, which hold for the forward and the (lazily
    compiled) backward alike. One of them is SourcesKey, so the on-disk caches never hand back
    code built from other sources. A user's post-grad pass without a uuid (which turns
    Inductor's caching off anyway) is left as it is."""
    user_pass = inductor_options.get("post_grad_custom_post_pass", torch._inductor.config.post_grad_custom_post_pass)
    if user_pass is None or isinstance(user_pass, CustomGraphPass):
        inductor_options = {**inductor_options, "post_grad_custom_post_pass": SourcesKey(user_pass)}
    return torch._TorchCompileInductorWrapper(mode, inductor_options, dynamic=None)(gm, example_inputs)


# The sites (by Dynamo's frame and the dropout node's name) that some compile of this process
# rewrote: a recompile of that frame (new shapes, a failed guard) that skips one of them warns.
_REWRITTEN_BEFORE = set()


def _frame():
    """Dynamo's id of the frame being compiled. Its first compile forgets what was recorded under
    that id: torch._dynamo.reset() numbers frames from 0 again, for other code."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    frame = getattr(compile_id, "frame_id", None)
    if getattr(compile_id, "frame_compile_id", None) == 0:
        _REWRITTEN_BEFORE.difference_update({key for key in _REWRITTEN_BEFORE if key[0] == frame})
    return frame


def _log_sites(sites):
    frame = _frame()
    for site in sites:
        where = " ".join(part for part in (site.module, site.location) if part) or site.name
        key = (frame, site.name, site.module, site.location)
        verdict = f"rewrote ({site.pattern})" if site.rewritten else f"skipped: {site.reason}"
        level = logging.INFO if site.rewritten or site.timing else logging.DEBUG  # timed: a verdict the user may want
        if site.rewritten:
            _REWRITTEN_BEFORE.add(key)
        elif key in _REWRITTEN_BEFORE and not site.requested:
            level, verdict = logging.WARNING, f"rewritten by an earlier compile, now {verdict} (element dropout)"
        log.log(level, "dropout %s (p=%s, %s, gemms %s) %s", where, site.p, site.consumer, site.gemms, verdict)


def _count(sites):
    stats = counters["slicecompile"]
    stats["sites"] += len(sites)
    for site in sites:
        stats["rewritten" if site.rewritten else "skipped"] += 1
        if site.rewritten:
            stats[f"rewritten_{site.pattern}"] += 1


def slicecompile_backend(gm, example_inputs, *, mode=None, options=None):
    """The backend callable Dynamo calls per graph (the entry point's target).

    Counters in torch._dynamo.utils.counters["slicecompile"]: graphs, sites, rewritten,
    rewritten_<pattern>, skipped, fallback, disabled, and ddp_pieces: the pieces DDPOptimizer
    split a rewritten graph into (ddp.py). torch._dynamo.reset() keeps them:
    clear with counters["slicecompile"].clear()."""
    settings, inductor_options = parse_options(options)
    if ddp.compiling_pieces():
        counters["slicecompile"]["ddp_pieces"] += 1
        return _inductor(gm, example_inputs, mode, inductor_options)
    return compile_rewritten(gm, settings, lambda graph: _inductor(graph, example_inputs, mode, inductor_options))


def compile_rewritten(gm, settings, compile_graph):
    """compile_graph(a rewritten copy of gm); compile_graph(gm) itself when nothing is
    rewritten, or when the rewrite or that compile fails (with a warning)."""
    stats = counters["slicecompile"]
    if disabled_by_env() or not settings.enabled:
        stats["disabled"] += 1
        return compile_graph(gm)
    restart_with_constant_p(gm)
    stats["graphs"] += 1
    try:
        rewritten = copy_graph(gm)
        sites = find_sites(rewritten, settings)
        applied = rewrite(rewritten, sites, settings.block, settings.samples_per_group)
    except DYNAMO_CONTROL_FLOW:
        raise
    except Exception:
        log.warning("slicecompile: the rewrite failed; compiling the original graph", exc_info=True)
        stats["fallback"] += 1
        return compile_graph(gm)
    _log_sites(sites)
    if not applied:
        _count(sites)
        return compile_graph(gm)
    try:
        compiled = compile_graph(rewritten)
    except DYNAMO_CONTROL_FLOW:
        raise
    except Exception:
        log.warning("slicecompile: compiling the rewritten graph failed; compiling the original", exc_info=True)
        stats["fallback"] += 1
        _count([replace(site, rewritten=False, reason="compile failed") for site in sites])
        return compile_graph(gm)
    _count(sites)
    return compiled


ddp.keep_sites_whole(slicecompile_backend, compile_rewritten)
