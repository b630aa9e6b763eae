"""The key that ties compiled artifacts to this copy of slicecompile.

Inductor's caches key a graph on the ops it calls, not on our ops' Python bodies or kernels, so
an edit to either must change the key itself: every Inductor compile carries SourcesKey, a
post-grad pass that changes no graph, whose uuid is a digest of slicecompile's sources.
"""

import functools
import hashlib
from pathlib import Path

from torch._inductor.custom_graph_pass import CustomGraphPass

from .. import kernels

PACKAGE_DIR = Path(__file__).parents[1]


def sources_digest(folders):
    """A digest of the .py files under folders (names and contents)."""
    digest = hashlib.sha256()
    for folder in map(Path, folders):
        for path in sorted(folder.rglob("*.py")):
            digest.update(f"{path.relative_to(folder)}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def sources_key():
    """The digest of the package's and its kernels' sources (kernels/ is installed as
    slicecompile.kernels but may live elsewhere, as in an editable install)."""
    return sources_digest([PACKAGE_DIR, Path(kernels.__file__).parent])


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
