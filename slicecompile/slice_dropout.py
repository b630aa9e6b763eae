"""Slice dropout (SliceOut's policy) before a linear layer: each call keeps one contiguous window
of input features, the same for every row, and drops the rest.

The window starts at a uniformly random feature and wraps around the end, so every feature is
kept with the same probability. Its width is the static ceil((1-p)·K); its last feature is kept
only with the probability that makes E[kept features] = (1-p)·K exactly. Kept values are scaled
by 1/(1-p), so the output is unbiased. Everything is drawn on the input's device from torch's
generator: no host synchronisation, and CUDA graphs replay fresh windows.

The GEMMs are dense: the window is gathered into a compact (rows, width) copy of x and a
(out, width) copy of the weight, F.linear runs on those (cuBLAS on a GPU), and autograd saves
only the compact copies, so the dropped features' activations are neither multiplied nor kept
for backward. Plain torch ops throughout, so torch.compile, autocast and activation
checkpointing (which replays the RNG state) handle it like any other PyTorch code.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import check_linear_operands, check_p


@dataclass(frozen=True)
class SliceMask:
    """index: (width,) int64 kept features, a cyclic window; weight: (width,) float32 factor
    each kept feature is multiplied by (1/(1-p), or 0 for a last feature drawn out)."""

    index: torch.Tensor
    weight: torch.Tensor
    in_features: int
    p: float

    def features(self):
        """(in_features,) float32 multiplier of each input feature: the dense form of the mask."""
        dense = torch.zeros(self.in_features, dtype=torch.float32, device=self.index.device)
        return dense.index_copy(0, self.index, self.weight)


def draw_slice_mask(in_features, p, device=None):
    """A slice mask over in_features features, dropping each with probability p (0 <= p < 1)."""
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    check_p(p)
    kept = (1.0 - p) * in_features
    width = max(1, math.ceil(kept))
    last = kept - (width - 1)  # probability that the window's last feature is kept
    u = torch.rand(2, device=device)
    start = (u[0] * in_features).long().clamp_(max=in_features - 1)
    index = (start + torch.arange(width, device=device)) % in_features
    weight = torch.full((width,), 1.0 / (1.0 - p), device=device)
    weight[-1] = weight[-1] * (u[1] < last)
    return SliceMask(index, weight, in_features, p)


def slice_dropout_linear_with_mask(x, weight, bias, mask: SliceMask):
    """F.linear(x ⊙ mask, weight, bias) computed on the kept window only."""
    check_linear_operands(x, weight, bias)
    if mask.in_features != x.shape[-1]:
        raise ValueError(f"the mask covers {mask.in_features} features, x has {x.shape[-1]}")
    if mask.index.device != x.device:
        raise ValueError(f"the mask is on {mask.index.device}, x on {x.device}")
    x_kept = x.index_select(-1, mask.index) * mask.weight.to(x.dtype)
    return F.linear(x_kept, weight.index_select(1, mask.index), bias)


def slice_dropout_linear(x, weight, bias=None, p=0.5, training=True):
    """F.linear(slice_dropout(x), weight, bias); training=False or p = 0 is exactly F.linear."""
    check_linear_operands(x, weight, bias)
    check_p(p)
    if not training or p == 0:
        return F.linear(x, weight, bias)
    return slice_dropout_linear_with_mask(x, weight, bias, draw_slice_mask(x.shape[-1], p, device=x.device))
