"""hashed_linear_cross_entropy: the cross-entropy of F.linear(x, weight, bias) over a sampled set
of output tiles (SLIDE's sampled softmax at tile granularity), with a full-layer evaluation.

x flattens to (M, E), weight is (N, E), target (M,) int64 class indices. In training, rows are
grouped in block-rows of BM samples, and each block-row computes `budget` output tiles of BN
neurons (simhash.py chooses them: label tiles first, then those SimHash ranks highest). Row i's
softmax covers the neurons of its block-row's tiles (those past N in a ragged last tile excluded)
plus its own label neuron: when the block-row's labels span more tiles than the budget, the label
tiles left out still reach their rows through one extra logit per row, x_i · w_{target_i} +
b_{target_i}, so every row's loss includes its label's logit and shapes stay static.

    loss_i = logsumexp_{j in active(i) ∪ {target_i}} z_ij - z_{i, target_i},  z = x Wᵀ + b

ignore_index rows, reductions and an empty batch behave as in F.cross_entropy. In evaluation
(training=False or grad disabled) the op is exactly F.cross_entropy(F.linear(x, weight, bias),
target).

Cost: the compact logits are (M, budget * BN), never (M, N); each GEMM does about `active` of a
dense one's work. Two paths compute them. On a GPU, sampled_softmax_kernels.py: masked-GEMM
kernels read the listed weight tiles in place (three GEMMs; the compact logits are kept for the
backward). Elsewhere, sampled_softmax.py: torch's batched GEMMs on gathered weight rows, chunk by
chunk, the logits recomputed in the backward (four GEMMs, memory dW plus one chunk). Hashing all
N weight rows adds bits * tables / M of one dense GEMM (simhash.py; WeightCodes keeps the hash
between steps). The weight gradient is a full (N, E) tensor, as autograd needs, zero outside the
active rows, accumulated in float32 (16-bit weights: twice their size, cast at the end): it
dominates the op's memory. Measured times: README.md and bench/README.md.
Out-of-range targets raise ValueError on a CPU; elsewhere they fail a device-side assert
(torch._assert_async) rather than synchronise with the host.
"""

import torch
import torch.nn.functional as F

from . import sampled_softmax, sampled_softmax_kernels
from .checks import check_block, check_linear_operands
from .masks import expand_tiles, flattened_rows
from .simhash import MAX_BITS, MAX_TABLES, select_tiles, tile_budget
from .weight_codes import WeightCodes

DEFAULT_HASHED_BLOCK = (64, 128)
# 12 bits x 4 tables: on planted data the chosen tiles held each sample's top neuron 84% of the
# time (45% at 8 x 4, 91% at 16 x 4); hashing cost 48 / M of a dense GEMM (simhash.py).
DEFAULT_BITS = 12
DEFAULT_TABLES = 4
REDUCTIONS = ("mean", "sum", "none")


def hashed_linear_cross_entropy(
    x,
    weight,
    target,
    bias=None,
    *,
    active=0.1,
    block=DEFAULT_HASHED_BLOCK,
    bits=DEFAULT_BITS,
    tables=DEFAULT_TABLES,
    ignore_index=-100,
    reduction="mean",
    training=True,
    weight_codes=None,
):
    """F.cross_entropy(F.linear(x, weight, bias), target) over the output tiles that SimHash picks
    for each block-row of BM samples (the module's docstring): about `active` of the N outputs,
    label tiles first. training=False or grad disabled: exactly the dense loss. reduction="none"
    returns target's shape. weight_codes: a WeightCodes that keeps weight's hash between calls and
    refreshes it on its schedule (weight_codes.py); None re-hashes weight at every call."""
    x, weight, bias, target = _check_operands(x, weight, bias, target, ignore_index, reduction)
    budget, block = _check_selection(weight.shape[0], active, block, bits, tables, weight_codes)
    x2d = x.reshape(flattened_rows(x), x.shape[-1])
    if not training or not torch.is_grad_enabled() or x2d.shape[0] == 0:
        return _dense(x2d, weight, bias, target, ignore_index, reduction)
    tiles = select_tiles(x2d, weight, target.reshape(-1), budget, block, bits, tables, ignore_index, weight_codes)
    return _over_tiles(x2d, weight, bias, target, tiles, block, ignore_index, reduction)


def hashed_linear_cross_entropy_with_tiles(
    x, weight, target, tiles, bias=None, *, block=DEFAULT_HASHED_BLOCK, ignore_index=-100, reduction="mean"
):
    """The training loss over explicit tiles: (n_blockrows, budget) int64 distinct tile indices per
    block-row, e.g. from select_active_tiles."""
    x, weight, bias, target = _check_operands(x, weight, bias, target, ignore_index, reduction)
    block = check_block(block)
    x2d = x.reshape(flattened_rows(x), x.shape[-1])
    _check_tiles(tiles, x2d.shape[0], weight.shape[0], block, x.device)
    if x2d.shape[0] == 0:
        return _dense(x2d, weight, bias, target, ignore_index, reduction)
    return _over_tiles(x2d, weight, bias, target, tiles, block, ignore_index, reduction)


def select_active_tiles(
    x,
    weight,
    target,
    *,
    active=0.1,
    block=DEFAULT_HASHED_BLOCK,
    bits=DEFAULT_BITS,
    tables=DEFAULT_TABLES,
    ignore_index=-100,
    weight_codes=None,
):
    """(n_blockrows, budget) int64 ascending tile indices that hashed_linear_cross_entropy computes
    for each block-row after the same torch.manual_seed (and the same weight_codes history);
    budget = min(n_tiles, ceil(active * N / BN)). Label tiles (most labels first), then SimHash's
    highest-ranked tiles (simhash.py)."""
    x, weight, _, target = _check_operands(x, weight, None, target, ignore_index, "mean")
    budget, block = _check_selection(weight.shape[0], active, block, bits, tables, weight_codes)
    x2d = x.reshape(flattened_rows(x), x.shape[-1])
    return select_tiles(x2d, weight, target.reshape(-1), budget, block, bits, tables, ignore_index, weight_codes)


def hashed_linear_cross_entropy_reference(
    x, weight, target, tiles, bias=None, *, block=DEFAULT_HASHED_BLOCK, ignore_index=-100, reduction="mean"
):
    """The definition on dense (M, N) logits, for tests: every logit outside active_neurons set to
    -inf, then F.cross_entropy. Any dtype, differentiable by autograd."""
    x2d = x.reshape(flattened_rows(x), x.shape[-1])
    kept = active_neurons(tiles, target.reshape(-1), block, weight.shape[0], ignore_index)
    logits = F.linear(x2d, weight, bias).masked_fill(~kept, float("-inf"))
    loss = F.cross_entropy(logits, target.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss.reshape(target.shape) if reduction == "none" else loss


def active_neurons(tiles, labels, block, n, ignore_index=-100):
    """(M, N) bool, the neurons in each row's softmax: its block-row's tiles (none past N) and its
    own label (unless ignored)."""
    table = torch.zeros(tiles.shape[0], -(-n // block[1]), dtype=torch.bool, device=tiles.device)
    kept = expand_tiles(table.scatter_(1, tiles, True), block, (labels.shape[0], n)).clone()
    rows = torch.arange(labels.shape[0], device=labels.device)[labels != ignore_index]
    kept[rows, labels[rows]] = True
    return kept


def _dense(x2d, weight, bias, target, ignore_index, reduction):
    logits = F.linear(x2d, weight, bias)
    loss = F.cross_entropy(logits, target.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss.reshape(target.shape) if reduction == "none" else loss


def _over_tiles(x2d, weight, bias, target, tiles, block, ignore_index, reduction):
    labels = target.reshape(-1)
    path = sampled_softmax_kernels if x2d.is_cuda else sampled_softmax
    losses = path.sampled_softmax_losses(x2d, weight, bias, labels, tiles, block, ignore_index)
    if reduction == "none":
        return losses.to(x2d.dtype).reshape(target.shape)
    total = losses.sum()
    if reduction == "sum":
        return total.to(x2d.dtype)
    # As F.cross_entropy: ignored rows leave the denominator, and all-ignored gives 0 / 0 = nan.
    return (total / (labels != ignore_index).sum()).to(x2d.dtype)


def _check_operands(x, weight, bias, target, ignore_index, reduction):
    x, weight, bias = check_linear_operands(x, weight, bias)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must hold int64 class indices, got dtype {target.dtype}")
    if target.device != x.device:
        raise ValueError(f"target is on {target.device} but x is on {x.device}")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"target must have x's leading shape {tuple(x.shape[:-1])}, got {tuple(target.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows: cross-entropy needs at least one class (out_features >= 1)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    _check_target_range(target, weight.shape[0], ignore_index)
    return x, weight, bias, target


def _check_target_range(target, n, ignore_index):
    """On a CPU the check is cheap and raises here; on other devices, and while torch.compile
    traces (fake or functional tensors, whose values are unknown), it is a device-side assert, so
    that it never waits for the device."""
    in_range = ((target >= 0) & (target < n)) | (target == ignore_index)
    if target.device.type != "cpu" or type(target) is not torch.Tensor:
        torch._assert_async(in_range.all(), f"target out of range: class indices must be in [0, {n}) or ignore_index")
    elif not in_range.all():
        bad = target[~in_range][0].item()
        raise ValueError(f"target holds {bad}, outside [0, {n}) and not ignore_index ({ignore_index})")


def _check_selection(n, active, block, bits, tables, weight_codes):
    """Returns (budget, block)."""
    if weight_codes is not None and not isinstance(weight_codes, WeightCodes):
        raise TypeError(f"weight_codes must be a slicecompile.WeightCodes or None, got {type(weight_codes).__name__}")
    if isinstance(active, bool) or not isinstance(active, (int, float)):
        raise TypeError(f"active must be a float, got {type(active).__name__}")
    if not 0 < active <= 1:  # NaN fails too
        raise ValueError(f"active must be in (0, 1], got {active}")
    block = check_block(block)
    for name, value, most in (("bits", bits, MAX_BITS), ("tables", tables, MAX_TABLES)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be a positive int, got {value!r}")
        if not 1 <= value <= most:
            raise ValueError(f"{name} must be in [1, {most}], got {value}")
    return tile_budget(n, block[1], active), block


def _check_tiles(tiles, m, n, block, device):
    n_blockrows, n_tiles = -(-m // block[0]), -(-n // block[1])
    if not isinstance(tiles, torch.Tensor):
        raise TypeError(f"tiles must be a torch.Tensor, got {type(tiles).__name__}")
    if tiles.dtype != torch.int64:
        raise TypeError(f"tiles must be int64 tile indices, got dtype {tiles.dtype}")
    if tiles.device != device:
        raise ValueError(f"tiles is on {tiles.device} but x is on {device}")
    if tiles.dim() != 2 or tiles.shape[0] != n_blockrows or not 1 <= tiles.shape[1] <= n_tiles:
        raise ValueError(
            f"tiles must have shape ({n_blockrows}, budget) with 1 <= budget <= {n_tiles} for {m} rows and {n} "
            f"outputs in blocks {block}, got {tuple(tiles.shape)}"
        )
