"""The sampled softmax of hashed_linear_cross_entropy on the Triton kernels: per-row losses and
gradients as _SampledSoftmaxCrossEntropy computes them, without gathering weight's rows.

x2d (M, E), weight (N, E), tiles (n_blockrows, budget) int64 of (BM, BN) blocks; the compact
logits Z are (M, budget * BN), column tile s of block-row r the logits of weight's tile
tiles[r, s]. Three masked GEMMs over the tile lists, each doing `active` of a dense one's work:
- forward: Z = X Wᵀ (+ b) tile by listed tile (sparse_output_matmul with columns; the columns of
  a ragged last tile past N come out -inf), then each row's log-sum-exp (torch);
- backward: dZ = softmax · g, minus g at the label's column (torch, float32), then
  dX = dZ W over each block-row's tiles (sparse_input_matmul, dZ compact along K) and
  dW = dZᵀ X over each tile's block-rows (sparse_input_matmul with listed row-blocks of dZᵀ: the
  tile's rows of its choosers' compact dZ), written in full: tiles nobody chose get zeros;
  db = dZ's column sums per block-row, added at their neurons (index_add_).
Row i's label logit, which joins its softmax where its tile is not among its block-row's, comes
from sampled_softmax.py's helpers, and its gradients as there. No host
synchronisation: the per-tile lists come from a sort of the tile table on the device. On an H100
(bfloat16, M = 16384, E = 768, N = 50304, 40 tiles of 128) forward and backward took 5-6 ms,
the three GEMMs about 1.3 of them; the rest is torch's elementwise work on Z and dZ.

Memory: Z is kept for backward (M × budget·BN in x's dtype, about as large as dZ, which backward
needs anyway) rather than recomputed as the CPU path does: that saves one GEMM of the three.
dX and dW are accumulated by the kernels in float32 and cast once, after the label gradients.
"""

import torch
from torch import Tensor

from ..kernels import sparse_input_matmul, sparse_output_matmul
from .dispatch import allow_tf32
from .sampled_softmax import label_terms, row_gradients, tile_neurons, with_label_gradients


def sampled_softmax_losses(x2d, weight, bias, labels, tiles, block, ignore_index):
    """(M,) float32 losses, zero for ignored rows; differentiable in x2d, weight and bias. x2d
    (M >= 1, E), weight (N, E) and bias (N,) or None share a dtype and a device; labels (M,) int64
    in [0, N) or ignore_index; tiles (cdiv(M, BM), budget) int64 distinct tile indices per
    block-row; block (BM, BN)."""
    return _SampledSoftmaxKernels.apply(x2d, weight, bias, labels, tiles, block, ignore_index)


class _SampledSoftmaxKernels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, labels, tiles, block, ignore_index):
        columns = tiles.to(torch.int32)
        logits = sampled_logits(x2d, weight, bias, columns, *block)
        compact_lse = torch.logsumexp(logits.float(), dim=1)
        label, label_logit, label_column, outside, lse, losses = label_terms(
            x2d, weight, bias, labels, tiles, block, ignore_index, compact_lse
        )
        ctx.save_for_backward(x2d, weight, logits, columns, compact_lse, lse, label, label_logit, label_column, outside)
        ctx.has_bias, ctx.block = bias is not None, block
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        x2d, weight, logits, columns, compact_lse, lse, label, label_logit, label_column, outside = ctx.saved_tensors
        g, grad_label = row_gradients(grad_losses, lse, label_logit, label_column, outside)
        grad_logits = _logit_gradients(logits, g * torch.exp(compact_lse - lse), g, label_column)
        need_x, need_w = ctx.needs_input_grad[:2]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_b = _bias_gradient(grad_logits, columns, ctx.block, weight.shape[0]) if need_b else None
        grad_logits = grad_logits.to(x2d.dtype)
        grad_x = _input_gradient(grad_logits, weight, columns, ctx.block) if need_x else None
        grad_w = _weight_gradient(grad_logits, x2d, columns, ctx.block, weight.shape[0]) if need_w else None
        grads = with_label_gradients((grad_x, grad_w, grad_b), x2d, weight, label, grad_label)
        return *grads, None, None, None, None


def _logit_gradients(logits, scale, g, label_column):
    """(M, budget * BN) float32 dZ = exp(z - lse) g - g at the label's column: the compact softmax
    (normalised without the extra label logit) times scale = g exp(compact_lse - lse). In one
    float32 buffer, so that softmax - 1 cancels before rounding, as in torch."""
    grad = torch.softmax(logits, dim=1, dtype=torch.float32).mul_(scale[:, None])
    inside = label_column >= 0
    return grad.scatter_add_(1, label_column.clamp(min=0)[:, None], torch.where(inside, -g, 0.0)[:, None])


def _bias_gradient(grad_logits, columns, block, n):
    """(N,) float32: dZ summed over each block-row's rows, then added at each column's neuron
    (columns past N hold zeros and add nothing)."""
    (m, width), block_m = grad_logits.shape, block[0]
    whole = m - m % block_m
    sums = grad_logits[:whole].view(-1, block_m, width).sum(dim=1)
    if whole < m:
        sums = torch.cat([sums, grad_logits[whole:].sum(dim=0, keepdim=True)])
    neurons, _ = tile_neurons(columns.long(), block[1], n)
    return torch.zeros(n, device=grad_logits.device).index_add_(0, neurons.flatten(), sums.flatten())


def _input_gradient(grad_logits, weight, columns, block):
    """(M, E) float32 dX: block-row r's compact dZ times the weight tiles it lists."""
    return sampled_grad_input(grad_logits, weight, columns, *block)


def _weight_gradient(grad_logits, x2d, columns, block, n):
    """(N, E) float32 dW: tile t's rows are Σ over the block-rows r that chose it of
    dZ[r's rows, t's compact columns]ᵀ X[r's rows]; zero for tiles nobody chose."""
    block_rows, slots, count = tile_choosers(columns, -(-n // block[1]))
    return sampled_grad_weight(grad_logits, x2d, block_rows, slots, count, n, *block)


# The three GEMMs are triton_ops, as the other ops' are: called in eager mode their kernels launch
# directly. Launched outside one, each call went through torch's wrap_triton path, which prunes an
# autotuned kernel's configs into a new, empty autotuner on every call
# (torch/_higher_order_ops/triton_kernel_wrap.py), so every call tuned again: about 1 s a call on
# an H100 at every shape (bench/results/logs/bench_hashed_outputs_kernels_h100.log). They run the
# first candidate config, untuned (5-6 ms for the whole op at M = 16384, E = 768, N = 50304 on
# that H100), until a GPU run checks tuning inside the triton_ops.
CONFIG = "first"


@torch.library.triton_op("slicecompile::sampled_logits", mutates_args=())
def sampled_logits(
    x: Tensor, weight: Tensor, bias: Tensor | None, columns: Tensor, block_m: int, block_n: int
) -> Tensor:
    """(M, width * BN) compact logits x @ weightᵀ (+ bias) of the weight tiles columns (n_blockrows,
    width) int32 lists for each block-row; -inf past N."""
    return sparse_output_matmul(
        x, weight.t(), None, (block_m, block_n), 1.0, bias=bias, allow_tf32=allow_tf32(), columns=columns, config=CONFIG
    )


@torch.library.triton_op("slicecompile::sampled_grad_input", mutates_args=())
def sampled_grad_input(grad_logits: Tensor, weight: Tensor, columns: Tensor, block_m: int, block_n: int) -> Tensor:
    """(M, E) float32: each block-row's compact grad_logits times the weight tiles columns lists."""
    out = torch.empty(grad_logits.shape[0], weight.shape[1], device=weight.device)
    budget = columns.new_full((1,), columns.shape[1])
    return sparse_input_matmul(
        grad_logits,
        weight,
        columns,
        budget,
        (block_m, block_n),
        1.0,
        out=out,
        allow_tf32=allow_tf32(),
        compact_a=True,
        config=CONFIG,
    )


@torch.library.triton_op("slicecompile::sampled_grad_weight", mutates_args=())
def sampled_grad_weight(
    grad_logits: Tensor,
    x: Tensor,
    block_rows: Tensor,
    slots: Tensor,
    count: Tensor,
    n: int,
    block_m: int,
    block_n: int,
) -> Tensor:
    """(N, E) float32: tile t's rows Σ over its choosers (tile_choosers) of their compact
    grad_logits' columns for t, transposed, times their rows of x; zeros for tiles none chose."""
    out = torch.empty(n, x.shape[1], device=x.device)
    return sparse_input_matmul(
        grad_logits.t(),
        x,
        block_rows,
        count,
        (block_n, block_m),
        1.0,
        out=out,
        allow_tf32=allow_tf32(),
        a_row_blocks=slots,
        config=CONFIG,
    )


def tile_choosers(columns, n_tiles):
    """For each of n_tiles tiles, the block-rows that listed it in columns (n_blockrows, budget)
    int32, ascending, and where in their list: (n_tiles, n_blockrows) int32 tables valid up to
    each tile's count, and the (n_tiles,) int32 counts. On the device, without synchronising."""
    n_blockrows, budget = columns.shape
    chosen, order = torch.sort(columns.flatten(), stable=True)
    starts = torch.searchsorted(chosen, torch.arange(n_tiles + 1, device=columns.device, dtype=torch.int32))
    position = torch.arange(chosen.numel(), device=columns.device) - starts[chosen]
    # Past each count the tables are never read: left unwritten.
    tables = torch.empty(2, n_tiles, n_blockrows, dtype=torch.int32, device=columns.device)
    tables[:, chosen, position] = torch.stack([order // budget, order % budget]).int()
    return tables[0], tables[1], starts.diff().int()
