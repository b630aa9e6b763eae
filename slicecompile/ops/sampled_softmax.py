"""The sampled softmax of hashed_linear_cross_entropy on torch's own ops, on any device (a CPU's
path; sampled_softmax_kernels.py is a GPU's), and the pieces both paths share.

x2d (M, E), weight (N, E), tiles (n_blockrows, budget) int64 of (BM, BN) blocks. Row i's loss is
the log-sum-exp of its block-row's compact logits (the tiles' neurons below N) and, where its
label's tile is not among them, its label logit, minus its label logit (hashed_linear_cross_entropy's
module docstring). Here the compact logits come from gathered weight rows and batched GEMMs, chunk
by chunk, and are recomputed in the backward rather than kept.
"""

import torch
import torch.nn.functional as F


def sampled_softmax_losses(x2d, weight, bias, labels, tiles, block, ignore_index):
    """(M,) float32 losses, zero for ignored rows; differentiable in x2d, weight and bias."""
    return _SampledSoftmaxCrossEntropy.apply(x2d, weight, bias, labels, tiles, block, ignore_index)


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
        neurons, valid = tile_neurons(tiles, block[1], n)
        offsets = _offsets(bias, neurons, valid, x2d.dtype)
        x_blocks = _blockrows(x2d, block[0], tiles.shape[0])
        compact_lse = _compact_logsumexp(x_blocks, weight, offsets, neurons, block[1]).flatten()[:m]
        label, label_logit, label_column, outside, lse, losses = label_terms(
            x2d, weight, bias, labels, tiles, block, ignore_index, compact_lse
        )
        ctx.save_for_backward(x2d, weight, offsets, lse, label, label_logit, label_column, outside, neurons)
        ctx.has_bias, ctx.block = bias is not None, block
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        x2d, weight, offsets, lse, label, label_logit, label_column, outside, neurons = ctx.saved_tensors
        g, grad_label = row_gradients(grad_losses, lse, label_logit, label_column, outside)
        need = (*ctx.needs_input_grad[:2], ctx.has_bias and ctx.needs_input_grad[2])
        grads = _compact_gradients(x2d, weight, offsets, lse, g, label_column, neurons, ctx.block, need)
        return *with_label_gradients(grads, x2d, weight, label, grad_label), None, None, None, None


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


def label_terms(x2d, weight, bias, labels, tiles, block, ignore_index, compact_lse):
    """What both paths derive from each row's label, given the log-sum-exp of its compact logits:
    (label, 0 where ignored; its logit z; its compact column, -1 where its tile is not among its
    block-row's or the row is ignored; outside, whether a labelled row's label is such an extra
    logit; lse, compact_lse with z added where outside; the (M,) float32 losses lse - z, zero for
    ignored rows)."""
    labelled = labels != ignore_index
    label = torch.where(labelled, labels, 0)
    label_logit = label_logits(x2d, weight, bias, label)
    label_column = torch.where(labelled, label_columns(tiles, label, block), -1)
    outside = labelled & (label_column < 0)
    lse = torch.where(outside, torch.logaddexp(compact_lse, label_logit.float()), compact_lse)
    return label, label_logit, label_column, outside, lse, torch.where(labelled, lse - label_logit.float(), 0.0)


def row_gradients(grad_losses, lse, label_logit, label_column, outside):
    """(g, grad_label): each row's loss gradient, zero for ignored rows, and the gradient of its
    extra label logit where it has one."""
    # where, not a product: with every row ignored the mean's gradient is 1 / 0, and must vanish.
    g = torch.where((label_column >= 0) | outside, grad_losses.float(), 0.0)
    # Where the label is the extra logit, its gradient is (its softmax share - 1) g; elsewhere the
    # -g goes on its compact column, so that softmax - 1 cancels before multiplying, as in torch.
    return g, torch.where(outside, g * (torch.exp(label_logit.float() - lse) - 1), 0.0)


def with_label_gradients(grads, x2d, weight, label, grad_label):
    """grads (float32) plus the label logits' own (dz · w_label to dX, dz · x to dW's label rows,
    dz to db), in the operands' dtype. dW's rows: index_put_ on a CPU, where index_add_ of rows
    cost ~90 ms at N = 670k however few; index_add_ on a GPU, whose atomics took 0.05 ms where
    index_put_(accumulate=True) sorted the rows for 1.3 ms, a fifth of the step (M = 16384,
    E = 768, bfloat16, H100)."""
    grad_x, grad_w, grad_b = grads
    if grad_x is not None:
        grad_x = grad_x.float() + grad_label[:, None] * weight.index_select(0, label).float()
    if grad_w is not None and grad_w.is_cuda:
        grad_w = grad_w.index_add_(0, label, grad_label[:, None] * x2d.float())
    elif grad_w is not None:
        grad_w = grad_w.index_put_((label,), grad_label[:, None] * x2d.float(), accumulate=True)
    if grad_b is not None:
        grad_b = grad_b.index_add_(0, label, grad_label)
    return tuple(None if grad is None else grad.to(x2d.dtype) for grad in (grad_x, grad_w, grad_b))


def tile_neurons(tiles, block_n, n):
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


def label_logits(x2d, weight, bias, label):
    """(M,) z_{i, label_i}, one dot product a row, in x's dtype with float32 accumulation (bmm)."""
    z = torch.bmm(x2d[:, None, :], weight.index_select(0, label)[:, :, None]).view(-1)
    return z if bias is None else z + bias[label]


def label_columns(tiles, label, block):
    """(M,) int64: row i's label's column in its block-row's compact logits, -1 where its tile is
    not among them."""
    rows = torch.arange(label.shape[0], device=label.device) // block[0]
    matches = tiles[rows] == (label // block[1])[:, None]
    column = matches.int().argmax(dim=1) * block[1] + label % block[1]
    return torch.where(matches.any(dim=1), column, -1)
