"""The compiler layer: the torch.compile backend (backend.py, the entry point) and what it runs
on each FX graph: options, the compile cache key, site finding over the pattern table, the
rewrite, DDP's graph splitting, and explain()."""

from .backend import slicecompile_backend
from .explain import Report, explain
from .options import Options, parse_options

__all__ = ["Options", "Report", "explain", "parse_options", "slicecompile_backend"]
