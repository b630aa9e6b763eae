"""dropout_bmm: batched matmul on a block-dropped left operand (attention probabilities → @ V),
as a torch.library custom op with the element-wise reference semantics; no kernel yet.

A is (batch, M, K), B is (batch, K, N). Each batch matrix of A is cut into (BM, BK) tiles
over its (M, K) plane — for attention, the (query, key) plane — with its own block mask;
every block-row of every matrix keeps the same number of tiles, as in masks.py:
Y = (A ⊙ mask) @ B · s with s = 1 / (1 - p). One draw_block_mask covers all matrices, their
block-rows stacked, so torch.manual_seed reproduces it and nothing syncs with the host.
Backward saves A, B and the tile index, never an element-wise mask.
"""

import torch
from torch import Tensor

from .checks import check_type
from .masks import BlockMask, draw_block_mask


def _block_rows(m, block_m):
    return -(-m // block_m)


def draw_batched_block_mask(batch, m, k, p, block, device=None):
    """One BlockMask for `batch` matrices of (m, k): block-row j of matrix b is row
    b · ceil(m / BM) + j of the stacked mask."""
    return draw_block_mask(batch * _block_rows(m, block[0]) * block[0], k, p, block, device=device)


def batched_elements(kept, count, shape, block, p):
    """(batch, M, K) bool element-wise mask of a batched BlockMask, for the op and references."""
    batch, m, k = shape
    rows = _block_rows(m, block[0])
    tiles = BlockMask(kept, count, (batch * rows * block[0], k), tuple(block), p).tiles()
    full = tiles.reshape(batch, rows, tiles.shape[1]).repeat_interleave(block[0], 1).repeat_interleave(block[1], 2)
    return full[:, :m, :k]


def _masked(a, kept, count, block_m, block_k, p):
    mask = batched_elements(kept, count, a.shape, (block_m, block_k), p)
    return a * mask.to(a.dtype) * (1.0 / (1.0 - p))


@torch.library.custom_op("slicecompile::block_dropout_bmm", mutates_args=())
def block_dropout_bmm(
    a: Tensor, b: Tensor, kept: Tensor, count: Tensor, block_m: int, block_k: int, p: float
) -> Tensor:
    """(a ⊙ mask) @ b / (1 - p) for a (batch, M, K) and b (batch, K, N)."""
    return torch.bmm(_masked(a, kept, count, block_m, block_k, p), b)


@block_dropout_bmm.register_fake
def _(a, b, kept, count, block_m, block_k, p):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[2])


@torch.library.custom_op("slicecompile::block_dropout_bmm_grad", mutates_args=())
def block_dropout_bmm_grad(
    grad_out: Tensor, a: Tensor, b: Tensor, kept: Tensor, count: Tensor, block_m: int, block_k: int, p: float
) -> tuple[Tensor, Tensor]:
    """(grad of a, grad of b). An op of its own, so that tracing the backward under dynamic
    shapes sees no mask arithmetic (which would guard on the sizes)."""
    grad_out = grad_out.contiguous()  # .sum() hands in a stride-0 expanded gradient
    grad_a = _masked(torch.bmm(grad_out, b.transpose(1, 2)), kept, count, block_m, block_k, p)
    grad_b = torch.bmm(_masked(a, kept, count, block_m, block_k, p).transpose(1, 2), grad_out)
    return grad_a, grad_b


@block_dropout_bmm_grad.register_fake
def _(grad_out, a, b, kept, count, block_m, block_k, p):
    return torch.empty_like(a), torch.empty_like(b)


def _setup_context(ctx, inputs, output):
    a, b, kept, count, block_m, block_k, p = inputs
    ctx.save_for_backward(a, b, kept, count)
    ctx.mask_args = (block_m, block_k, p)


def _backward(ctx, grad_out):
    a, b, kept, count = ctx.saved_tensors
    grad_a, grad_b = block_dropout_bmm_grad(grad_out, a, b, kept, count, *ctx.mask_args)
    return grad_a, grad_b, None, None, None, None, None


block_dropout_bmm.register_autograd(_backward, setup_context=_setup_context)


def dropout_bmm_with_mask(a, b, mask):
    """a (..., M, K) @ b (..., K, N), same batch dims, under a mask from draw_batched_block_mask.
    Empty operands give what torch.matmul gives."""
    _check_bmm_operands(a, b, mask)
    batch = a.shape[:-2]
    a3, b3 = a.reshape(batch.numel(), *a.shape[-2:]), b.reshape(batch.numel(), *b.shape[-2:])
    y = block_dropout_bmm(a3, b3, mask.kept, mask.count, *mask.block, mask.p)
    return y.reshape(*batch, a.shape[-2], b.shape[-1])


def _check_bmm_operands(a, b, mask):
    for name, t in (("a", a), ("b", b)):
        check_type(name, t, torch.Tensor)
        if t.dim() < 3:
            raise ValueError(f"{name} must have batch dimensions: (..., rows, cols), got shape {tuple(t.shape)}")
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"a and b must share their batch dimensions, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"a has {a.shape[-1]} columns but b has {b.shape[-2]} rows")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share one dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    check_type("mask", mask, BlockMask)
    m, k = a.shape[-2:]
    rows = a.shape[:-2].numel() * _block_rows(m, mask.block[0]) * mask.block[0]
    if tuple(mask.shape) != (rows, k):
        raise ValueError(
            f"the mask covers {tuple(mask.shape)} but a's matrices ({a.shape[:-2].numel()} of ({m}, {k})) "
            f"stack to ({rows}, {k}) (draw_batched_block_mask)"
        )
    if mask.kept.device != a.device:
        raise ValueError(f"the mask is on {mask.kept.device} but a is on {a.device}")


def dropout_bmm_reference(a, b, mask):
    """The element-wise definition, differentiable by autograd."""
    a3 = a.reshape(a.shape[:-2].numel(), *a.shape[-2:])
    elements = batched_elements(mask.kept, mask.count, a3.shape, mask.block, mask.p)
    masked = (a3 * elements.to(a.dtype) * mask.scale).reshape(a.shape)
    return masked @ b
