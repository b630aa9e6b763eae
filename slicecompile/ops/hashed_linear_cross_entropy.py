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

Cost: the compact logits are (M, budget * BN), never (M, N), and are never kept: forward saves
per-row statistics only, and backward recomputes each chunk's logits, so four GEMMs (logits
twice, dX, dW) each do about `active` of a dense GEMM's work. Hashing all N weight rows adds
bits * tables / M of one dense GEMM (simhash.py). Chunks of the compact logits gather at most
GATHER_FRACTION of weight's rows at a time. The weight gradient is a full (N, E) tensor, as
autograd needs, zero outside the active rows, accumulated in float32 (16-bit weights: twice
their size, cast at the end): it dominates the op's memory. Measured on a 2-core CPU (float32,
active 0.05, bench/bench_hashed_outputs.py, two threads): Amazon-670K's layer 0.44 s a step
against the dense 2.15 s, at 0.19 of its peak memory; a GPT-2 LM head (2,048 tokens) 0.61 s
against 2.89 s, at 0.15 ((128, 128) blocks: 0.37 s and 0.48 s, with a lower hit rate).
Out-of-range targets raise ValueError on a CPU; elsewhere they fail a device-side assert
(torch._assert_async) rather than synchronise with the host.
"""

import torch
import torch.nn.functional as F

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
    losses = _SampledSoftmaxCrossEntropy.apply(x2d, weight, bias, labels, tiles, block, ignore_index)
    if reduction == "none":
        return losses.to(x2d.dtype).reshape(target.shape)
    total = losses.sum()
    if reduction == "sum":
        return total.to(x2d.dtype)
    # As F.cross_entropy: ignored rows leave the denominator, and all-ignored gives 0 / 0 = nan.
    return (total / (labels != ignore_index).sum()).to(x2d.dtype)


# A chunk of the compact logits gathers at most this fraction of weight's rows (or 2^20 elements),
# so that it adds little to the full-size dW that backward returns: 1/16 keeps Amazon-670K's step
# at active 0.05 under a fifth of the dense step's memory. Two block-rows a chunk where there are
# two, their columns split to fit: at Amazon-670K's shape a batch of two ran 2.5x faster than one
# block-row at a time on two CPU threads, and as fast as all four at once.
GATHER_FRACTION = 1 / 16
MIN_CHUNK_ELEMENTS = 1 << 20


class _SampledSoftmaxCrossEntropy(torch.autograd.Function):
    """Per-row float32 losses over the active tiles (zero for ignored rows). Saves per-row
    statistics (log-normaliser, label logit) and the tile index, never the compact logits: backward
    gathers each chunk's weight tiles again and recomputes its logits (one more GEMM of the active
    work), so that the op's memory is dW plus one chunk."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, labels, tiles, block, ignore_index):
        m, n = x2d.shape[0], weight.shape[0]
        neurons, valid = _tile_neurons(tiles, block[1], n)
        offsets = _offsets(bias, neurons, valid, x2d.dtype)
        x_blocks = _blockrows(x2d, block[0], tiles.shape[0])
        compact_lse = _compact_logsumexp(x_blocks, weight, offsets, neurons, block[1]).flatten()[:m]
        labelled = labels != ignore_index
        label = torch.where(labelled, labels, 0)
        label_logit = _label_logits(x2d, weight, bias, label)
        label_column = torch.where(labelled, _label_columns(tiles, label, block), -1)
        outside = labelled & (label_column < 0)
        lse = torch.where(outside, torch.logaddexp(compact_lse, label_logit.float()), compact_lse)
        ctx.save_for_backward(x2d, weight, offsets, lse, label, label_logit, label_column, outside, neurons)
        ctx.has_bias, ctx.block = bias is not None, block
        return torch.where(labelled, lse - label_logit.float(), 0.0)

    @staticmethod
    def backward(ctx, grad_losses):
        x2d, weight, offsets, lse, label, label_logit, label_column, outside, neurons = ctx.saved_tensors
        # where, not a product: with every row ignored the mean's gradient is 1 / 0, and must vanish.
        g = torch.where((label_column >= 0) | outside, grad_losses.float(), 0.0)
        # Where the label is the extra logit, its gradient is (its softmax share - 1) g; elsewhere the
        # -g goes on its compact column, so that softmax - 1 cancels before multiplying, as in torch.
        grad_label = torch.where(outside, g * (torch.exp(label_logit.float() - lse) - 1), 0.0)
        need = (*ctx.needs_input_grad[:2], ctx.has_bias and ctx.needs_input_grad[2])
        grads = _compact_gradients(x2d, weight, offsets, lse, g, label_column, neurons, ctx.block, need)
        return *_with_label_gradients(grads, x2d, weight, label, grad_label), None, None, None, None


def _compact_gradients(x2d, weight, offsets, lse, g, label_column, neurons, block, need):
    """dX = dZ W_c, dW = Σ_blockrows dZᵀ X_c and db = Σ_rows dZ over each block-row's active
    neurons, dZ = softmax · g, one chunk of block-rows at a time: the chunk's gathered tiles and
    logits (turned into dZ in place) are all the memory it adds to dW. dW's rows outside every
    active tile stay zero; dW and db accumulate in float32 (16-bit weights: cast at the end)."""
    need_x, need_w, need_b = need
    (n_blockrows, width), (n, e), m = neurons.shape, weight.shape, x2d.shape[0]
    (block_m, block_n), n_tiles = block, -(-n // block[1])
    x_blocks = _blockrows(x2d, block_m, n_blockrows)
    lse, g = (F.pad(v, (0, n_blockrows * block_m - m)).view(n_blockrows, block_m, 1) for v in (lse, g))
    label_column = F.pad(label_column, (0, n_blockrows * block_m - m), value=-1).view(n_blockrows, block_m, 1)
    grad_x = torch.zeros_like(x_blocks) if need_x else None
    # Whole tiles, so that each gathered tile's gradient adds in as one slab (index_add_ of tiles:
    # 5-7x faster than index_put_ of their rows on a CPU); the rows past N are cut off at the end.
    tile_grads = torch.zeros(n_tiles, block_n, e, device=x2d.device) if need_w else None
    grad_b = torch.zeros(n, device=x2d.device) if need_b else None
    for chunk in _chunks(n_blockrows, width, weight, block_n):
        rows, index = chunk[0], neurons[chunk].flatten()
        tiles_w, logits = _chunk_logits(x_blocks, weight, offsets, neurons, chunk)
        grad_logits = logits.float().sub_(lse[rows]).exp_().mul_(g[rows])
        _subtract_at_labels(grad_logits, g[rows], label_column[rows] - chunk[1].start)
        if need_b:
            grad_b.index_add_(0, index, grad_logits.sum(1).flatten())
        grad_logits = grad_logits.to(x2d.dtype)
        if need_x:
            grad_x[rows].baddbmm_(grad_logits, tiles_w)
        if need_w:  # the gathered rows are spent: their buffer takes their gradient
            torch.bmm(grad_logits.transpose(1, 2), x_blocks[rows], out=tiles_w)
            # index_put_, not index_add_: on a CPU index_add_ of rows costs ~90 ms at N = 670k however few.
            tile_grads.index_add_(
                0, neurons[rows, chunk[1]][:, ::block_n].flatten() // block_n, tiles_w.view(-1, block_n, e).float()
            )
        del tiles_w, logits, grad_logits  # before the next chunk allocates its own
    grad_w = None if tile_grads is None else tile_grads.view(-1, e)[:n]
    return (None if grad_x is None else grad_x.view(-1, e)[:m]), grad_w, grad_b


def _subtract_at_labels(grad_logits, g, column):
    """grad_logits (r, BM, c) minus g at each row's label column, where that lies in the chunk."""
    inside = (column >= 0) & (column < grad_logits.shape[2])
    grad_logits.scatter_add_(2, column.clamp(0, grad_logits.shape[2] - 1), torch.where(inside, -g, 0.0))


def _with_label_gradients(grads, x2d, weight, label, grad_label):
    """grads plus the label logits' own (dz · w_label to dX, dz · x to dW's label rows, dz to
    db), in the operands' dtype."""
    grad_x, grad_w, grad_b = grads
    if grad_x is not None:
        grad_x = grad_x.float() + grad_label[:, None] * weight.index_select(0, label).float()
    if grad_w is not None:
        grad_w = grad_w.index_put_((label,), grad_label[:, None] * x2d.float(), accumulate=True)
    if grad_b is not None:
        grad_b = grad_b.index_add_(0, label, grad_label)
    return tuple(None if grad is None else grad.to(x2d.dtype) for grad in (grad_x, grad_w, grad_b))


def _tile_neurons(tiles, block_n, n):
    """(n_blockrows, budget * BN) int64 neuron of each compact column, clamped into range, and
    whether it exists (False past N in a ragged last tile)."""
    neurons = (tiles[:, :, None] * block_n + torch.arange(block_n, device=tiles.device)).flatten(1)
    valid = neurons < n
    return torch.where(valid, neurons, n - 1), valid


def _offsets(bias, neurons, valid, dtype):
    """What each compact logit starts from: its bias (0 without one), -inf where no neuron is."""
    start = torch.zeros((), dtype=dtype, device=neurons.device) if bias is None else bias[neurons]
    return torch.where(valid, start, float("-inf")).to(dtype)


def _blockrows(x2d, block_m, n_blockrows):
    """x2d (M, E) as (n_blockrows, BM, E), zero rows padding a ragged last block-row."""
    pad = n_blockrows * block_m - x2d.shape[0]
    return F.pad(x2d, (0, 0, 0, pad)).view(n_blockrows, block_m, x2d.shape[1])


def _chunks(n_blockrows, width, weight, block_n):
    """(block-rows, columns) slices covering the compact logits, each gathering at most
    GATHER_FRACTION of weight's rows (MIN_CHUNK_ELEMENTS elements at least) in whole tiles."""
    limit = max(int(GATHER_FRACTION * weight.shape[0]), MIN_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    rows = max(min(2, n_blockrows), limit // width)
    cols = min(width, max(1, limit // rows // block_n) * block_n)
    return [
        (slice(r, r + rows), slice(c, c + cols)) for r in range(0, n_blockrows, rows) for c in range(0, width, cols)
    ]


def _chunk_logits(x_blocks, weight, offsets, neurons, chunk):
    """A chunk's gathered weight rows (r, c, E) and logits (r, BM, c)."""
    rows, cols = chunk
    index = neurons[rows, cols]
    tiles_w = weight.index_select(0, index.flatten()).view(*index.shape, weight.shape[1])
    # bmm then add_: baddbmm's broadcast copy of the offsets cost 1.5x the GEMM on a CPU.
    return tiles_w, torch.bmm(x_blocks[rows], tiles_w.transpose(1, 2)).add_(offsets[rows, None, cols])


def _compact_logsumexp(x_blocks, weight, offsets, neurons, block_n):
    """(n_blockrows, BM) float32 log-sum-exp of each row's compact logits, chunk by chunk."""
    lse = torch.full(x_blocks.shape[:2], float("-inf"), device=x_blocks.device)
    for chunk in _chunks(*neurons.shape, weight, block_n):
        part = torch.logsumexp(_chunk_logits(x_blocks, weight, offsets, neurons, chunk)[1].float(), dim=-1)
        lse[chunk[0]] = torch.logaddexp(lse[chunk[0]], part)
    return lse


def _label_logits(x2d, weight, bias, label):
    """(M,) z_{i, label_i}, one dot product a row, in x's dtype with float32 accumulation (bmm)."""
    z = torch.bmm(x2d[:, None, :], weight.index_select(0, label)[:, :, None]).view(-1)
    return z if bias is None else z + bias[label]


def _label_columns(tiles, label, block):
    """(M,) int64: row i's label's column in its block-row's compact logits, -1 where its tile is
    not among them."""
    rows = torch.arange(label.shape[0], device=label.device) // block[0]
    matches = tiles[rows] == (label // block[1])[:, None]
    column = matches.int().argmax(dim=1) * block[1] + label % block[1]
    return torch.where(matches.any(dim=1), column, -1)


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
