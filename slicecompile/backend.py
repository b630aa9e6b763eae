"""The torch.compile backend: `torch.compile(model, backend="slicecompile", options={...})`.

Dynamo hands us each FX graph; we rewrite the dropout → matmul sites on a copy (fx_pass
decides, rewrite applies), then hand the graph to Inductor exactly as backend="inductor"
would, with `mode=` and Inductor options passed through. Anything that goes wrong in the
rewrite compiles the original graph instead: a training run never dies because of us.

Registered by the `torch_dynamo_backends` entry point (pyproject.toml), never with
@register_backend as well: Dynamo raises "duplicate name" when both are present.
"""

import copy
import functools
import hashlib
import logging
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch._inductor.config  # noqa: F401  (parse_options reads its keys)
from torch._dynamo.exc import RestartAnalysis, SkipFrame, TensorifyScalarRestartAnalysis
from torch._dynamo.symbolic_convert import TensorifyState
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils._sympy.symbol import SymT, symbol_is_type

from . import ddp, kernels
from .checks import check_block
from .dropout_linear_op import DEFAULT_BLOCK
from .fx_pass import find_sites, graph_modules, is_dropout
from .rewrite import rewrite

log = logging.getLogger("slicecompile")
try:  # makes TORCH_LOGS="+slicecompile" reach our logger; a private torch API, so optional
    torch._logging._internal.register_log("slicecompile", "slicecompile")
except Exception:  # pragma: no cover
    pass

# Exceptions by which Dynamo and AOTAutograd steer compilation (e.g. "retrace with this float
# constant"): never mistaken for a failed rewrite.
DYNAMO_CONTROL_FLOW = (RestartAnalysis, SkipFrame)
POLICIES = ("block", "slice")
# M*K*N below which a GEMM is left to Inductor: 256³. Not yet measured: a guess that smaller
# GEMMs are bound by launch overhead, where skipping tiles cannot pay for the mask's kernels.
DEFAULT_MIN_GEMM_SIZE = 2**24


@dataclass(frozen=True)
class Options:
    """What options={...} may set besides Inductor's own keys."""

    block: tuple = DEFAULT_BLOCK  # the tile of the dropped matrix: (BM, BK) of the input, (BM, BN) of the output
    policy: str = "block"  # or "slice": one window of input features per linear layer (other sites stay block)
    input_side: bool = True  # rewrite dropout -> matmul
    output_side: bool = True  # rewrite matmul -> dropout
    min_gemm_size: int = DEFAULT_MIN_GEMM_SIZE  # M*K*N summed over a site's matmuls
    enabled: bool = True
    samples_per_group: int = 8  # dropout -> conv2d, block policy: samples sharing one channel mask


OPTION_NAMES = tuple(f.name for f in fields(Options))


def parse_options(options):
    """Split options={...} into our Options and the Inductor config patches; an unknown key
    raises ValueError listing the known ones."""
    ours, inductor = {}, {}
    inductor_keys = torch._inductor.config.get_config_copy()
    for key, value in (options or {}).items():
        if key in OPTION_NAMES:
            ours[key] = value
        elif key.replace("-", "_") in inductor_keys:
            inductor[key] = value
        else:
            raise ValueError(
                f"unknown slicecompile option {key!r}; slicecompile options are {', '.join(OPTION_NAMES)}, "
                "and any torch._inductor option (torch._inductor.list_options()) is passed to Inductor"
            )
    return _validated(replace(Options(), **ours)), inductor


def _validated(options):
    block = check_block(options.block)
    if options.policy not in POLICIES:
        raise ValueError(f"unknown policy {options.policy!r}; known policies: {', '.join(POLICIES)}")
    size = options.min_gemm_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"min_gemm_size must be an int >= 0, got {size!r}")
    for name in ("enabled", "input_side", "output_side"):
        if not isinstance(getattr(options, name), bool):
            raise TypeError(f"{name} must be a bool, got {getattr(options, name)!r}")
    group = options.samples_per_group
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"samples_per_group must be a positive int, got {group!r}")
    return replace(options, block=block)


def disabled_by_env():
    return os.environ.get("SLICECOMPILE_DISABLE", "0") not in ("", "0")


def sources_digest(folders):
    """A digest of the .py files under folders (names and contents)."""
    digest = hashlib.sha256()
    for folder in map(Path, folders):
        for path in sorted(folder.rglob("*.py")):
            digest.update(f"{path.relative_to(folder)}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def sources_key():
    """The key that ties compiled artifacts to this copy of slicecompile: Inductor's caches key a
    graph on the ops it calls, not on our ops' Python bodies or kernels, so an edit to either
    must change the key itself."""
    return sources_digest([Path(__file__).parent, Path(kernels.__file__).parent])


class SourcesKey(CustomGraphPass):
    """An Inductor post-grad pass that changes no graph, only cache keys: its uuid carries
    sources_key() (and the uuid of the pass it wraps, one the user set)."""

    def __init__(self, wrapped=None):
        self.wrapped = wrapped

    def __call__(self, graph):
        if self.wrapped is not None:
            self.wrapped(graph)

    def uuid(self):
        return sources_key(), None if self.wrapped is None else self.wrapped.uuid()


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


def _copy(gm):
    """A GraphModule with its own graph and class (recompile sets forward on the class), and
    copies of its subgraphs (a checkpointed body may be rewritten), sharing parameters and
    Dynamo's attributes (meta, shape_env, ...) with gm."""
    graph = copy.deepcopy(gm.graph)  # copies nodes and their meta dicts, not the fake tensors in them
    for old, node in zip(gm.graph.nodes, graph.nodes, strict=True):
        for key, value in old.__dict__.items():  # e.g. placeholders' _dynamo_source, read by AOTAutograd
            node.__dict__.setdefault(key, value)
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for key, value in gm.__dict__.items():
        new.__dict__.setdefault(key, value)
    new.meta = dict(getattr(gm, "meta", {}))
    for node in graph.find_nodes(op="get_attr"):
        if isinstance(getattr(gm, node.target, None), torch.fx.GraphModule):
            setattr(new, node.target, _copy(getattr(gm, node.target)))
    return new


def restart_with_constant_p(gm):
    """With dynamic=True, Dynamo passes float attributes (nn.Dropout.p, a global P) as tensors
    read back with .item(), so p reaches the pass as a node. AOTAutograd would later ask
    Dynamo to retrace with those floats constant, after a wasted compile; ask now, the same way."""
    names = set()
    dropouts = (node for sub, _ in graph_modules(gm) for node in filter(is_dropout, sub.graph.nodes))
    for node in dropouts:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
        value = p.meta.get("example_value") if isinstance(p, torch.fx.Node) else None
        if isinstance(value, torch.SymFloat):  # _expr: the symbol itself, before Dynamo's replacement by the value
            expr = getattr(value.node, "_expr", value.node.expr)
            names |= {str(s) for s in expr.free_symbols if symbol_is_type(s, SymT.FLOAT)}
    if names:
        for name in sorted(names):
            TensorifyState.specialize(name)
        raise TensorifyScalarRestartAnalysis


def _log_sites(sites):
    for site in sites:
        where = " ".join(part for part in (site.module, site.location) if part) or site.name
        level = logging.INFO if site.rewritten else logging.DEBUG
        verdict = f"rewrote ({site.pattern})" if site.rewritten else f"skipped: {site.reason}"
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
    split a rewritten graph into (slicecompile/ddp.py). torch._dynamo.reset() keeps them:
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
        rewritten = _copy(gm)
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


ddp.keep_sites_whole()
