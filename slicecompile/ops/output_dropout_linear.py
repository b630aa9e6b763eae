"""linear_dropout: block dropout on the output of F.linear, as torch.library custom ops.

Y = (X Wᵀ + b) ⊙ M · s for X flattened to (M, K), M a block mask over the output (M, N) made of
(BM, BN) tiles, s = 1 / (1 - p). The input side's primitives with their roles permuted, one op
per GEMM, each skipping the dropped tiles:
- forward: only kept tiles of X Wᵀ + b computed, zeros written elsewhere (sparse_output_matmul,
  the bias in its epilogue);
- dX = (dY ⊙ M · s) W: dY is the block-sparse left operand, its block-rows' kept tiles the
  reduction's only steps (sparse_input_matmul, as the input side's forward);
- dW = (dY ⊙ M · s)ᵀ X: dYᵀ is the block-sparse left operand, listed by the mask's columns
  (sparse_input_matmul over masks.column_index, as the input side's weight gradient);
- db = Σ_rows dY ⊙ M · s: dY summed per block-row, then masked by the tile table (torch ops).
Backward saves x, weight and the tiny tile index (kept, count), never an element-wise mask.
The mask is drawn outside the ops by plain torch code, as on the input side, so the ops are
deterministic and a recomputation can reuse a saved mask.

CUDA tensors run the Triton kernels; CPU tensors run the dense reference (the same definition,
element by element), or the kernels through Triton's interpreter when TRITON_INTERPRET=1.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import sparse_input_matmul, sparse_output_matmul
from . import dispatch, reference
from .checks import check_block, check_linear_operands, check_mask_fits, check_p
from .dispatch import allow_tf32
from .masks import (
    DEFAULT_BLOCK,
    BlockMask,
    column_index,
    draw_block_mask,
    dropout_scale,
    expand_tiles,
    flattened_rows,
    mask_of,
)


@torch.library.triton_op("slicecompile::linear_block_dropout", mutates_args=())
def linear_block_dropout(
    x: Tensor, weight: Tensor, bias: Tensor | None, kept: Tensor, count: Tensor, block_m: int, block_n: int, p: float
) -> Tensor:
    """(x @ weightᵀ + bias) ⊙ mask / (1 - p) for 2-D x (M, K); the mask over the (M, N) output is
    (kept, count)."""
    mask = mask_of(kept, count, (x.shape[0], weight.shape[0]), block_m, block_n, p)
    if not dispatch.use_kernels(x):
        return reference.output_forward(x, weight, bias, mask.elements(), mask.scale)
    tiles = mask.tiles()
    return sparse_output_matmul(x, weight.t(), tiles, mask.block, mask.scale, bias=bias, allow_tf32=allow_tf32())


@torch.library.triton_op("slicecompile::linear_block_dropout_grad_input", mutates_args=())
def linear_block_dropout_grad_input(
    grad_out: Tensor, weight: Tensor, kept: Tensor, count: Tensor, block_m: int, block_n: int, p: float
) -> Tensor:
    """(grad_out ⊙ mask) @ weight / (1 - p), shape (M, K); the mask is (kept, count)."""
    mask = mask_of(kept, count, grad_out.shape, block_m, block_n, p)
    if not dispatch.use_kernels(grad_out):
        return reference.output_grad_input(grad_out, weight, mask.elements(), mask.scale)
    return sparse_input_matmul(grad_out, weight, kept, count, mask.block, mask.scale, allow_tf32=allow_tf32())


@torch.library.triton_op("slicecompile::linear_block_dropout_grad_weight", mutates_args=())
def linear_block_dropout_grad_weight(
    grad_out: Tensor,
    x: Tensor,
    tiles: Tensor,
    col_rows: Tensor,
    col_count: Tensor,
    block_m: int,
    block_n: int,
    p: float,
) -> Tensor:
    """(grad_out ⊙ mask)ᵀ @ x / (1 - p), shape (N, K); the mask is the tile table and its column
    index (masks.column_index)."""
    if not dispatch.use_kernels(x):
        elements = expand_tiles(tiles, (block_m, block_n), grad_out.shape)
        return reference.output_grad_weight(grad_out, x, elements, dropout_scale(p))
    # Row n of dYᵀ keeps the block-rows that column tile n // BN keeps: the mask's column lists.
    return sparse_input_matmul(
        grad_out.t(), x, col_rows, col_count, (block_n, block_m), dropout_scale(p), allow_tf32=allow_tf32()
    )


def _grad_bias(grad_out, tiles, block, scale):
    """Σ_rows grad_out ⊙ mask · scale without an element-wise mask: grad_out summed per block-row
    (in float32), then each block-row's sums kept or dropped by its tiles."""
    (rows, n), (block_m, block_n) = grad_out.shape, block
    whole = rows - rows % block_m
    sums = grad_out[:whole].reshape(-1, block_m, n).sum(dim=1, dtype=torch.float32)
    if whole < rows:
        sums = torch.cat([sums, grad_out[whole:].sum(dim=0, keepdim=True, dtype=torch.float32)])
    keep = tiles.repeat_interleave(block_n, dim=1)[:, :n]
    return ((sums * keep).sum(dim=0) * scale).to(grad_out.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, kept, count, block_m, block_n, p = inputs
    ctx.save_for_backward(x, weight, kept, count)
    ctx.mask_args = (block_m, block_n, p)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    """The tile table and its column index are derived here in plain torch ops, which
    torch.compile traces and fuses; the GEMMs are ops of their own."""
    x, weight, kept, count = ctx.saved_tensors
    block_m, block_n, p = ctx.mask_args
    needs_bias = ctx.has_bias and ctx.needs_input_grad[2]
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = linear_block_dropout_grad_input(grad_out, weight, kept, count, *ctx.mask_args)
    if ctx.needs_input_grad[1] or needs_bias:
        tiles = mask_of(kept, count, grad_out.shape, *ctx.mask_args).tiles()
    if ctx.needs_input_grad[1]:
        grad_weight = linear_block_dropout_grad_weight(grad_out, x, tiles, *column_index(tiles), *ctx.mask_args)
    if needs_bias:
        grad_bias = _grad_bias(grad_out, tiles, (block_m, block_n), dropout_scale(p))
    return grad_x, grad_weight, grad_bias, None, None, None, None, None


linear_block_dropout.register_autograd(_backward, setup_context=_setup_context)


def linear_dropout(x, weight, bias=None, p=0.5, block=DEFAULT_BLOCK, training=True):
    """block_dropout(F.linear(x, weight, bias)): whole (BM, BN) tiles of the output, flattened to
    (rows, out_features), are kept or dropped, every block-row keeping the same number of tiles;
    kept values are scaled by 1 / (1 - p). Dropped tiles are never computed. With training=False
    or p=0 this is exactly F.linear(x, weight, bias). p must be in [0, 1). With in_features = 0
    the output is the bias alone, and that is what is dropped."""
    x, weight, bias = check_linear_operands(x, weight, bias)
    check_p(p)
    block = check_block(block)
    if not training or p == 0:
        return F.linear(x, weight, bias)
    mask = draw_block_mask(flattened_rows(x), weight.shape[0], p, block, device=x.device)
    return _under_mask(x, weight, bias, mask)


def linear_dropout_with_mask(x, weight, bias, mask: BlockMask):
    """linear_dropout under an explicit mask (from draw_block_mask over the output flattened to
    (rows, out_features))."""
    x, weight, bias = check_linear_operands(x, weight, bias)
    check_mask_fits(mask, BlockMask, (flattened_rows(x), weight.shape[0]), x.device, masked="the output")
    return _under_mask(x, weight, bias, mask)


def _under_mask(x, weight, bias, mask):
    x2d = x.reshape(flattened_rows(x), x.shape[-1])
    if dispatch.any_empty(x, weight):  # the definition itself: no kernel over a zero-size grid
        y = reference.output_forward(x2d, weight, bias, mask.elements(), mask.scale)
    else:
        y = linear_block_dropout(x2d, weight, bias, mask.kept, mask.count, *mask.block, mask.p)
    return y.reshape(*x.shape[:-1], weight.shape[0])
