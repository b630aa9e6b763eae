"""slicecompile: block-structured dropout with GEMMs that skip the dropped tiles."""

from .dropout_linear_op import DEFAULT_BLOCK, dropout_linear, dropout_linear_with_mask
from .explain import explain
from .linear_dropout_op import linear_dropout, linear_dropout_with_mask
from .masks import BlockMask, draw_block_mask
from .reference import dropout_linear_reference, linear_dropout_reference
from .slice_dropout import SliceWindow, draw_slice_window, slice_dropout_linear, slice_dropout_linear_with_window

__all__ = [
    "DEFAULT_BLOCK",
    "BlockMask",
    "SliceWindow",
    "draw_block_mask",
    "draw_slice_window",
    "dropout_linear",
    "dropout_linear_reference",
    "dropout_linear_with_mask",
    "explain",
    "linear_dropout",
    "linear_dropout_reference",
    "linear_dropout_with_mask",
    "slice_dropout_linear",
    "slice_dropout_linear_with_window",
]
__version__ = "0.1.0"
