"""DistributedDataParallel's graph splitting must not cut a dropout from its matmul.

Under DDP, Dynamo hands each graph to DDPOptimizer, which splits it at gradient-bucket
boundaries and compiles every piece with the backend on its own; a dropout and the linear layer
it feeds can land in different pieces, where neither shows the site. For backend="slicecompile"
the whole graph is therefore rewritten before the split: the rewritten matmuls still take their
weights as inputs, so the buckets come out the same, and the pieces compile as usual (they hold
no dropout → matmul sites any more). Dynamo builds its DDPOptimizer from the class in
torch._dynamo.backends.distributed at each compile, so that class is replaced by a subclass
that does this for our backend and nothing for any other.
"""

import contextlib
import contextvars

import torch._dynamo.backends.distributed as distributed

from .options import parse_options

_PIECES = contextvars.ContextVar("slicecompile_ddp_pieces", default=False)


def compiling_pieces():
    """True while DDPOptimizer compiles the pieces of a graph already rewritten whole: the
    backend then compiles each piece as it is, and counts it as a piece, not as a graph."""
    return _PIECES.get()


@contextlib.contextmanager
def _pieces():
    token = _PIECES.set(True)
    try:
        yield
    finally:
        _PIECES.reset(token)


class SiteKeepingDDPOptimizer(distributed.DDPOptimizer):
    """For our backend, compile_whole(graph, settings, compile_pieces) instead of splitting
    first; both are set by keep_sites_whole (the backend's module installs this hook, so this
    module never imports it back)."""

    backend = None
    compile_whole = None

    def compile_fn(self, gm, example_inputs, **compiler_configs):
        wrapper = self.backend_compile_fn  # torch.compile's wrapper: the backend and its kwargs
        split = super().compile_fn
        if getattr(wrapper, "compiler_fn", wrapper) is not type(self).backend:
            return split(gm, example_inputs, **compiler_configs)
        settings, _ = parse_options(getattr(wrapper, "kwargs", {}).get("options"))

        def split_into_pieces(graph):
            with _pieces():
                return split(graph, example_inputs, **compiler_configs)

        return type(self).compile_whole(gm, settings, split_into_pieces)


def keep_sites_whole(backend, compile_whole):
    """Make Dynamo build SiteKeepingDDPOptimizer instead of its own, for graphs compiled by
    backend: compile_whole(gm, settings, compile_graph) rewrites gm and calls compile_graph on
    the result (backend.compile_rewritten)."""
    SiteKeepingDDPOptimizer.backend = staticmethod(backend)
    SiteKeepingDDPOptimizer.compile_whole = staticmethod(compile_whole)
    if not issubclass(distributed.DDPOptimizer, SiteKeepingDDPOptimizer):
        distributed.DDPOptimizer = SiteKeepingDDPOptimizer
