"""Channel-structured dropout before a 2-D convolution (dropout → conv2d, as in a Wide ResNet
block: conv → BN → ReLU → dropout → conv).

Whole input channels of x (N, C, H, W) are kept or dropped instead of single elements, and the
convolution runs on the kept channels only: the kept channels of x and the matching input-channel
slices of the weight are gathered into compact tensors and F.conv2d runs on those. Autograd thus
saves only the compact kept input (never x, never an element-wise mask), and dX/dW are computed
for kept channels only (index_select's backward leaves zeros everywhere else).

Both policies keep every (sample, channel) with probability exactly 1 - p and scale kept values
by 1 / (1 - p), so E[output] is the dense output:

- "block": consecutive samples form groups of `samples_per_group` (the last may be smaller) and
  channels form blocks of `block_channels` (the last may be partial). Every group keeps the same
  number of blocks, count = floor(e) + [u < frac(e)] with e = (1 - p) * blocks, so E[count] = e
  even with one or two blocks; which blocks is uniform per group. One grouped convolution
  (groups = sample groups, each with its own gathered channels and weight slices) computes all.
- "slice" (SliceOut): one cyclic window of ceil((1 - p) * C) channels starting at a uniformly
  drawn channel, shared by the whole batch; its last channel is kept only with the probability
  that makes E[kept] = (1 - p) * C. One dense convolution on the window.

Static shapes: every group has ceil(e) slots of block_channels channels. The slot not kept in a
draw with count = floor(e), and the channels past C in a partial last block, get factor 0 (their
index is clamped to a real channel), so every size depends only on (N, C, p, block settings).
A ragged last sample group is padded with copies of the last sample whose outputs are dropped.
Everything comes from one torch.rand call on x's device: torch.manual_seed reproduces it, there
is no host synchronisation, and torch.compile traces it whole (fullgraph=True).

Numerics: with several sample groups each group convolves its own gathered copy of the weight,
so dW is a sum of per-group partials, each rounded to x's dtype by the convolution's backward
(then summed in float32). In float16/bfloat16 that is less exact than one dense reduction over
the batch when the partials cancel; the bias is added after the grouped convolution so that db
stays a single reduction.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dispatch
from .checks import check_operands, check_p, check_size, check_type

POLICIES = ("block", "slice")


@dataclass(frozen=True)
class ChannelMask:
    """channels: (groups, width) int64, the input channels sample group g convolves with (the
    same static width for every group); factor: (groups, width) float32 multiplier of each of
    them, 1/(1-p) where kept, 0 where a slot is not kept in this draw or lies past the last
    channel. Sample n belongs to group n // group_size."""

    channels: torch.Tensor
    factor: torch.Tensor
    shape: tuple  # (N, C) of x
    group_size: int
    p: float
    policy: str

    @property
    def groups(self):
        return self.channels.shape[0]

    def factors(self):
        """(N, C) float32 multiplier of every (sample, channel): the dense form of the mask."""
        batch, channels = self.shape
        dense = torch.zeros(self.groups, channels, dtype=torch.float32, device=self.channels.device)
        # A sum, not a copy: clamped padding slots repeat a real channel, always with factor 0.
        dense = dense.scatter_add(1, self.channels, self.factor)
        return dense.repeat_interleave(self.group_size, dim=0)[:batch]


def draw_channel_mask(batch, channels, p, policy="block", block_channels=16, samples_per_group=8, device=None):
    """A ChannelMask over x of shape (batch, channels, ...), dropping each (sample, channel)
    with probability p (0 <= p < 1). No samples or no channels give a mask of no channels."""
    check_size("batch", batch)
    check_size("channels", channels)
    check_p(p)
    _check_settings(policy, block_channels, samples_per_group)
    if policy == "slice":
        return _draw_slice(batch, channels, float(p), device)
    return _draw_blocks(batch, channels, float(p), block_channels, samples_per_group, device)


def _draw_blocks(batch, channels, p, block_channels, samples_per_group, device):
    group_size = _max(_min(samples_per_group, batch), 1)  # an empty batch: one group of no samples
    groups, blocks = -(-batch // group_size), -(-channels // block_channels)
    expected = (1.0 - p) * blocks
    whole = math.floor(expected)
    fraction = expected - whole
    slots = whole + (fraction > 0)  # the static maximum of count; >= 1 since p < 1, unless no channels
    # One draw per mask: a compiler may run independent draws in any order.
    uniform = torch.rand(groups * blocks + 1, device=device)
    count = whole + (uniform[-1:] < fraction).long()  # E[count] = expected exactly
    # The first `slots` of a uniform permutation: distinct random blocks, the first `count` kept.
    chosen = uniform[:-1].view(groups, blocks).argsort(dim=1)[:, :slots]
    offsets = torch.arange(block_channels, device=device)
    index = (chosen[:, :, None] * block_channels + offsets).flatten(1)
    slot_kept = (torch.arange(slots, device=device) < count).repeat_interleave(block_channels)
    factor = (slot_kept & (index < channels)).to(torch.float32) * (1.0 / (1.0 - p))
    return ChannelMask(index.clamp(max=channels - 1), factor, (batch, channels), group_size, p, "block")


def _draw_slice(batch, channels, p, device):
    expected = (1.0 - p) * channels
    width = math.ceil(expected)  # >= 1 since p < 1, unless no channels (an empty window)
    last = expected - (width - 1)  # probability that the window's last channel is kept
    uniform = torch.rand(2, device=device)
    start = (uniform[0] * channels).long().clamp(max=channels - 1)
    positions = torch.arange(width, device=device)
    index = (start + positions) % _max(channels, 1)
    drop = (positions == width - 1) & (uniform[1] >= last)
    factor = (~drop).to(torch.float32) * (1.0 / (1.0 - p))
    return ChannelMask(index[None], factor[None], (batch, channels), _max(batch, 1), p, "slice")


def _symbolic(*sizes):
    return any(isinstance(size, torch.SymInt) for size in sizes)


def _min(a, b):
    """min(a, b) without a guard on a symbolic size (torch.sym_min); plain min on ints, which
    Dynamo cannot trace through torch.sym_min under a default device (torch 2.11)."""
    return torch.sym_min(a, b) if _symbolic(a, b) else min(a, b)


def _max(a, b):
    return torch.sym_max(a, b) if _symbolic(a, b) else max(a, b)


def dropout_conv2d_with_mask(x, weight, bias, mask, stride=1, padding=0, dilation=1):
    """F.conv2d(x ⊙ mask, weight, bias, stride, padding, dilation) on the kept channels only. An
    empty x or weight is exactly F.conv2d: dropping channels of an empty x changes nothing, and
    with no output channels nothing depends on x."""
    x, weight, bias = _check_conv_operands(x, weight, bias)
    _check_mask_fits(mask, x)
    conv = {"stride": stride, "padding": padding, "dilation": dilation}
    if dispatch.any_empty(x, weight):
        return F.conv2d(x, weight, bias, **conv)
    if mask.groups == 1:  # one set of channels for the whole batch: a plain dense convolution
        index = mask.channels[0]
        x_kept = x.index_select(1, index) * mask.factor[0].to(x.dtype)[:, None, None]
        return F.conv2d(x_kept, weight.index_select(1, index), bias, **conv)
    return _grouped_conv2d(x, weight, bias, mask, conv)


def _grouped_conv2d(x, weight, bias, mask, conv):
    """Sample group g's kept channels become input group g of one F.conv2d(groups=G): x is
    gathered to (group_size, G * per_group, H, W), the weight to (G * out_channels, per_group, kh, kw)."""
    batch, channels, height, width = x.shape
    out_channels, groups, size = weight.shape[0], mask.groups, mask.group_size
    per_group = mask.channels.shape[1]
    group_ids, member_ids = torch.arange(groups, device=x.device), torch.arange(size, device=x.device)
    # (size, groups): member s of every group side by side; a ragged last group repeats sample N-1.
    samples = (group_ids * size + member_ids[:, None]).clamp(max=batch - 1)
    rows = (samples[:, :, None] * channels + mask.channels).flatten()
    x_kept = x.reshape(batch * channels, height, width).index_select(0, rows)
    x_kept = x_kept.view(size, groups * per_group, height, width) * mask.factor.to(x.dtype).view(-1, 1, 1)
    # Gathered from a float32 copy so that index_select's backward sums the groups' dW partials
    # in float32: summed in float16/bfloat16 they exceeded twice the error of PyTorch's per-group
    # dW in 23 of 2000 draws (10 groups of one sample), in float32 in none.
    w_kept = weight.float().index_select(1, mask.channels.flatten()).to(weight.dtype)
    # view, not unflatten: Dynamo cannot trace Tensor.unflatten under torch.set_default_device.
    w_kept = w_kept.view(out_channels, groups, per_group, *weight.shape[2:])
    w_kept = w_kept.transpose(0, 1).reshape(groups * out_channels, per_group, *weight.shape[2:])
    y = F.conv2d(x_kept, w_kept, None, groups=groups, **conv)  # (size, G * out_channels, H', W')
    y = y.view(size, groups, out_channels, *y.shape[2:]).transpose(0, 1).flatten(0, 1)[:batch]
    # The bias outside the grouped conv: db is then one reduction over the batch, not G partial
    # sums rounded to x's dtype and added up (an error of 5x torch's on a float16 db).
    return y if bias is None else y + bias[:, None, None]


def dropout_conv2d(
    x,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    p=0.5,
    training=True,
    policy="block",
    block_channels=16,
    samples_per_group=8,
):
    """F.conv2d(channel_dropout(x), weight, bias, ...) with groups = 1; training=False or p = 0
    is exactly F.conv2d. padding may be anything F.conv2d accepts ("same" included)."""
    x, weight, bias = _check_conv_operands(x, weight, bias)
    check_p(p)
    _check_settings(policy, block_channels, samples_per_group)
    if not training or p == 0:
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    batch, channels = x.shape[:2]
    mask = draw_channel_mask(batch, channels, p, policy, block_channels, samples_per_group, device=x.device)
    return dropout_conv2d_with_mask(x, weight, bias, mask, stride, padding, dilation)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")


def _check_settings(policy, block_channels, samples_per_group):
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    _check_positive_int("block_channels", block_channels)
    _check_positive_int("samples_per_group", samples_per_group)


def _check_conv_operands(x, weight, bias):
    """F.conv2d's layout with groups = 1: x (N, C, H, W), weight (out, C, kh, kw), bias (out,).
    Returns the operands as the op computes them (check_operands)."""
    x, weight, bias = check_operands(x, weight, bias)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels, kh, kw), got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight expects in_channels = {weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)}; grouped convolutions are not supported)"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return x, weight, bias


def _check_mask_fits(mask, x):
    check_type("mask", mask, ChannelMask)
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"the mask covers (N, C) = {tuple(mask.shape)} but x has {tuple(x.shape[:2])}")
    if mask.channels.device != x.device:
        raise ValueError(f"the mask is on {mask.channels.device} but x is on {x.device}")
