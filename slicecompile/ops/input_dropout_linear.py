"""dropout_linear: F.linear on block-dropped input, as torch.library custom ops.

Three ops, one per GEMM: the forward (block-sparse X times Wᵀ), the input gradient (only
kept tiles of dY·W computed, zeros elsewhere) and the weight gradient (dropped tiles skipped
in the reduction). They are triton_ops: torch.compile traces them with no graph break,
AOTAutograd sees the backward, and Inductor launches the kernels from its compiled code
rather than through a Python op call. The mask is drawn outside the ops by plain torch code,
so the ops themselves are deterministic and a recomputation can reuse a saved mask.
Backward saves weight, the tiny tile index and a compact copy of x's kept tiles (about
(1 - p) of x, written by the forward GEMM as it reads them), never x itself or an element-wise
mask; the weight gradient reads that copy directly. Of a site's kernels only the three GEMMs
are ours; the rest (the mask, its tile table and column index, the bias gradient) is torch code
that Inductor fuses.

CUDA tensors run the Triton kernels; CPU tensors run the dense reference (the same
definition, element by element), or the kernels through Triton's interpreter when
TRITON_INTERPRET=1.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import sparse_input_matmul, sparse_output_matmul
from . import dispatch, masks, reference
from .checks import check_block, check_linear_operands, check_mask_fits, check_p
from .dispatch import allow_tf32
from .masks import (
    DEFAULT_BLOCK,
    BlockMask,
    column_index,
    column_slots,
    draw_block_mask,
    dropout_scale,
    expand_tiles,
    flattened_rows,
    mask_of,
    max_count,
)
from .slice_dropout_linear import slice_dropout_linear


@torch.library.triton_op("slicecompile::block_dropout_linear", mutates_args=())
def block_dropout_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, kept: Tensor, count: Tensor, block_m: int, block_k: int, p: float
) -> tuple[Tensor, Tensor]:
    """(x ⊙ mask) @ weightᵀ / (1 - p) + bias for 2-D x (M, K); the mask is (kept, count).
    Also returns x's kept tiles side by side (masks.gather_tiles), for backward."""
    mask = mask_of(kept, count, x.shape, block_m, block_k, p)
    slots = max_count(kept.shape[1], p)
    if not dispatch.use_kernels(x):
        compact = masks.gather_tiles(x, kept, mask.block, slots)
        return reference.forward(x, weight, bias, mask.elements(), mask.scale), compact
    compact = x.new_empty(x.shape[0], slots * block_k)
    y = sparse_input_matmul(
        x, weight.t(), kept, count, mask.block, mask.scale, bias=bias, allow_tf32=allow_tf32(), compact_out=compact
    )
    return y, compact


@torch.library.triton_op("slicecompile::block_dropout_linear_grad_input", mutates_args=())
def block_dropout_linear_grad_input(
    grad_out: Tensor, weight: Tensor, tiles: Tensor, block_m: int, block_k: int, p: float
) -> Tensor:
    """(grad_out @ weight) ⊙ mask / (1 - p), shape (M, K); the mask is the tile table."""
    block = (block_m, block_k)
    if not dispatch.use_kernels(grad_out):
        elements = expand_tiles(tiles, block, (grad_out.shape[0], weight.shape[1]))
        return reference.grad_input(grad_out, weight, elements, dropout_scale(p))
    return sparse_output_matmul(grad_out, weight, tiles, block, dropout_scale(p), allow_tf32=allow_tf32())


@torch.library.triton_op("slicecompile::block_dropout_linear_grad_weight", mutates_args=())
def block_dropout_linear_grad_weight(
    grad_out: Tensor,
    compact: Tensor,
    kept: Tensor,
    col_rows: Tensor,
    col_slots: Tensor,
    col_count: Tensor,
    in_features: int,
    block_m: int,
    block_k: int,
    p: float,
) -> Tensor:
    """grad_outᵀ @ (x ⊙ mask) / (1 - p), shape (N, K = in_features), from x's compact copy (the
    forward's) and the mask's column index (masks.column_index) with the slots where each
    listed block-row holds the K-tile (masks.column_slots)."""
    if not dispatch.use_kernels(compact):
        # x's kept tiles in place, zeros elsewhere: x ⊙ mask itself
        masked = masks.scatter_tiles(compact, kept, (block_m, block_k), (compact.shape[0], in_features))
        return reference.grad_weight(grad_out, masked, masked.new_ones(()), dropout_scale(p))
    # dWᵀ = (x ⊙ mask)ᵀ @ dY: the block-sparse-input GEMM over the mask's columns, reading each
    # listed tile of xᵀ from its block-row's slot in the compact copy.
    grad_weight = torch.empty(grad_out.shape[1], in_features, device=compact.device, dtype=compact.dtype)
    sparse_input_matmul(
        compact.t(),
        grad_out,
        col_rows,
        col_count,
        (block_k, block_m),
        dropout_scale(p),
        out=grad_weight.t(),
        allow_tf32=allow_tf32(),
        a_row_blocks=col_slots,
    )
    return grad_weight


def _setup_context(ctx, inputs, output):
    x, weight, bias, kept, count, block_m, block_k, p = inputs
    ctx.save_for_backward(output[1], weight, kept, count)
    ctx.mask_args = (block_m, block_k, p)
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out, _grad_compact):
    """The tile table and its column index are derived here in plain torch ops, which
    torch.compile traces and fuses; the GEMMs are ops of their own."""
    compact, weight, kept, count = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        slots = mask_of(kept, count, ctx.x_shape, *ctx.mask_args).slots()
        tiles = slots >= 0
    if ctx.needs_input_grad[0]:
        grad_x = block_dropout_linear_grad_input(grad_out, weight, tiles.to(torch.uint8), *ctx.mask_args)
    if ctx.needs_input_grad[1]:
        col_rows, col_count = column_index(tiles)
        col_slots = column_slots(slots, col_rows)
        grad_weight = block_dropout_linear_grad_weight(
            grad_out, compact, kept, col_rows, col_slots, col_count, ctx.x_shape[1], *ctx.mask_args
        )
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = reference.grad_bias(grad_out)
    return grad_x, grad_weight, grad_bias, None, None, None, None, None


block_dropout_linear.register_autograd(_backward, setup_context=_setup_context)


POLICIES = ("block", "slice")


def dropout_linear(x, weight, bias=None, p=0.5, block=DEFAULT_BLOCK, training=True, policy="block"):
    """F.linear(block_dropout(x), weight, bias): whole (BM, BK) tiles of x, flattened to
    (rows, in_features), are kept or dropped, every block-row keeping the same number of
    tiles; kept values are scaled by 1 / (1 - p). With training=False or p=0 this is
    exactly F.linear(x, weight, bias), and so is an empty x or weight (dropping elements of an
    empty x changes nothing, and with out_features = 0 nothing depends on x). p must be in
    [0, 1). policy="slice" keeps one contiguous window of features for every row instead
    (slice_dropout_linear; block unused)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known policies: {', '.join(POLICIES)}")
    if policy == "slice":
        return slice_dropout_linear(x, weight, bias, p=p, training=training)
    x, weight, bias = check_linear_operands(x, weight, bias)
    check_p(p)
    block = check_block(block)
    if not training or p == 0:
        return F.linear(x, weight, bias)
    mask = draw_block_mask(flattened_rows(x), x.shape[-1], p, block, device=x.device)
    return _under_mask(x, weight, bias, mask)


def dropout_linear_with_mask(x, weight, bias, mask: BlockMask):
    """dropout_linear under an explicit mask (from draw_block_mask over x flattened to 2-D)."""
    x, weight, bias = check_linear_operands(x, weight, bias)
    check_mask_fits(mask, BlockMask, (flattened_rows(x), x.shape[-1]), x.device)
    return _under_mask(x, weight, bias, mask)


def _under_mask(x, weight, bias, mask):
    if dispatch.any_empty(x, weight):
        return F.linear(x, weight, bias)
    x2d = x.reshape(flattened_rows(x), x.shape[-1])
    y, _ = block_dropout_linear(x2d, weight, bias, mask.kept, mask.count, *mask.block, mask.p)
    return y.reshape(*x.shape[:-1], weight.shape[0])
