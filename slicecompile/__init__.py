"""slicecompile: block-structured dropout with GEMMs that skip the dropped tiles.

Layers, data flowing one way: compiler/ (the torch.compile backend) → ops/ (the public ops) →
kernels (Triton, installed as slicecompile.kernels); demo/ and tools/ sit on top."""

from .compiler import explain
from .ops import (
    DEFAULT_BLOCK,
    AttentionMask,
    BlockMask,
    SliceWindow,
    WeightCodes,
    draw_attention_mask,
    draw_block_mask,
    draw_slice_window,
    dropout_attention,
    dropout_attention_reference,
    dropout_attention_with_mask,
    dropout_linear,
    dropout_linear_reference,
    dropout_linear_with_mask,
    hashed_linear_cross_entropy,
    hashed_linear_cross_entropy_reference,
    hashed_linear_cross_entropy_with_tiles,
    linear_dropout,
    linear_dropout_reference,
    linear_dropout_with_mask,
    select_active_tiles,
    slice_dropout_linear,
    slice_dropout_linear_with_window,
)

__all__ = [
    "DEFAULT_BLOCK",
    "AttentionMask",
    "BlockMask",
    "SliceWindow",
    "WeightCodes",
    "draw_attention_mask",
    "draw_block_mask",
    "draw_slice_window",
    "dropout_attention",
    "dropout_attention_reference",
    "dropout_attention_with_mask",
    "dropout_linear",
    "dropout_linear_reference",
    "dropout_linear_with_mask",
    "explain",
    "hashed_linear_cross_entropy",
    "hashed_linear_cross_entropy_reference",
    "hashed_linear_cross_entropy_with_tiles",
    "linear_dropout",
    "linear_dropout_reference",
    "linear_dropout_with_mask",
    "select_active_tiles",
    "slice_dropout_linear",
    "slice_dropout_linear_with_window",
]
__version__ = "0.1.0"
