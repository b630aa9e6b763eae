"""slicecompile: block-structured dropout with GEMMs that skip the dropped tiles."""

from .dropout_linear_op import DEFAULT_BLOCK, dropout_linear, dropout_linear_with_mask
from .explain import explain
from .masks import BlockMask, draw_block_mask
from .reference import dropout_linear_reference

__all__ = [
    "DEFAULT_BLOCK",
    "BlockMask",
    "draw_block_mask",
    "dropout_linear",
    "dropout_linear_reference",
    "dropout_linear_with_mask",
    "explain",
]
__version__ = "0.1.0"
