"""The ops layer: each public op with its autograd, its masks, dense references and argument
checks. Data flows down to slicecompile.kernels; nothing here knows about the compiler."""

from .attention_reference import dropout_attention_reference
from .dropout_attention import (
    AttentionMask,
    draw_attention_mask,
    dropout_attention,
    dropout_attention_with_mask,
)
from .dropout_conv2d import ChannelMask, draw_channel_mask, dropout_conv2d, dropout_conv2d_with_mask
from .hashed_linear_cross_entropy import (
    hashed_linear_cross_entropy,
    hashed_linear_cross_entropy_reference,
    hashed_linear_cross_entropy_with_tiles,
    select_active_tiles,
)
from .input_dropout_linear import dropout_linear, dropout_linear_with_mask
from .masks import DEFAULT_BLOCK, BlockMask, draw_block_mask
from .output_dropout_linear import linear_dropout, linear_dropout_with_mask
from .reference import dropout_linear_reference, linear_dropout_reference
from .slice_dropout_linear import SliceWindow, draw_slice_window, slice_dropout_linear, slice_dropout_linear_with_window
from .weight_codes import WeightCodes

__all__ = [
    "DEFAULT_BLOCK",
    "AttentionMask",
    "BlockMask",
    "ChannelMask",
    "SliceWindow",
    "WeightCodes",
    "draw_attention_mask",
    "draw_block_mask",
    "draw_channel_mask",
    "draw_slice_window",
    "dropout_attention",
    "dropout_attention_reference",
    "dropout_attention_with_mask",
    "dropout_conv2d",
    "dropout_conv2d_with_mask",
    "dropout_linear",
    "dropout_linear_reference",
    "dropout_linear_with_mask",
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
