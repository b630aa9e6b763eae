"""Copy a block mask's kept tiles between a matrix and a compact copy of them.

gather_tiles: x (M, K) -> compact (M, slots * MASK_BK), where block-row i's slot j holds tile
kept[i, j] of x (zeros for a sentinel slot and past x's edges). scatter_tiles writes them back
into the kept tiles of an (M, K) matrix and leaves its other tiles alone. The dropout ops save
the compact copy for backward instead of x. A straight copy at memory bandwidth: on an H200,
torch.gather with a broadcast tile index moved the same bytes about four times slower.
"""

import torch
import triton
import triton.language as tl

from .runtime import traceable

ROWS = 16  # rows per program: every mask block has at least 16


@triton.jit
def copy_tiles_kernel(
    x_ptr,
    compact_ptr,
    kept_ptr,
    M,
    K,
    tiles_per_row,
    stride_xm,
    stride_xk,
    stride_cm,
    stride_ck,
    stride_kept_m,
    stride_kept_k,
    MASK_BM: tl.constexpr,
    MASK_BK: tl.constexpr,
    ROWS: tl.constexpr,
    TO_COMPACT: tl.constexpr,
):
    """x: (M, K), compact: (M, slots * MASK_BK), kept: (cdiv(M, MASK_BM), >= slots) int32 tile
    indices (tiles_per_row marks an unused slot). Program (r, j) copies rows [r * ROWS, (r + 1) *
    ROWS) of slot j: from x into compact if TO_COMPACT, else back."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    slot = tl.program_id(1)
    tile = tl.load(kept_ptr + (tl.program_id(0) * ROWS // MASK_BM) * stride_kept_m + slot * stride_kept_k)
    cols = tile * MASK_BK + tl.arange(0, MASK_BK)
    in_rows = rows[:, None] < M
    in_x = in_rows & (cols[None, :] < K) & (tile < tiles_per_row)
    x = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :] * stride_xk
    compact_cols = slot * MASK_BK + tl.arange(0, MASK_BK)
    compact = compact_ptr + rows.to(tl.int64)[:, None] * stride_cm + compact_cols[None, :] * stride_ck
    if TO_COMPACT:
        tl.store(compact, tl.load(x, mask=in_x, other=0.0), mask=in_rows)
    else:
        tl.store(x, tl.load(compact, mask=in_x), mask=in_x)


def _check(x, compact, kept, block):
    if kept.dtype != torch.int32 or kept.dim() != 2:
        raise TypeError(f"kept must be a 2-D int32 tensor, got {kept.dtype} of shape {tuple(kept.shape)}")
    if block[0] % ROWS or block[1] & (block[1] - 1):
        raise ValueError(f"the mask block {tuple(block)} must have a multiple of {ROWS} rows and 2^n columns")
    if kept.shape[0] != triton.cdiv(x.shape[0], block[0]):
        raise ValueError(f"kept has {kept.shape[0]} block-rows, x {x.shape[0]} rows of blocks of {block[0]}")
    if compact.shape[0] != x.shape[0] or compact.shape[1] % block[1] or compact.shape[1] // block[1] > kept.shape[1]:
        raise ValueError(f"compact has shape {tuple(compact.shape)}, x {tuple(x.shape)}, block {tuple(block)}")


def _launch(x, compact, kept, block, to_compact):
    _check(x, compact, kept, block)
    grid = (triton.cdiv(x.shape[0], ROWS), compact.shape[1] // block[1])
    traceable(copy_tiles_kernel)[grid](
        x,
        compact,
        kept,
        x.shape[0],
        x.shape[1],
        triton.cdiv(x.shape[1], block[1]),
        x.stride(0),
        x.stride(1),
        compact.stride(0),
        compact.stride(1),
        kept.stride(0),
        kept.stride(1),
        MASK_BM=block[0],
        MASK_BK=block[1],
        ROWS=ROWS,
        TO_COMPACT=to_compact,
    )


def gather_tiles(x, kept, block, slots):
    """(M, slots * BK) compact copy of the first `slots` kept tiles of each block-row of x (M, K)."""
    compact = torch.empty(x.shape[0], slots * block[1], device=x.device, dtype=x.dtype)
    _launch(x, compact, kept, block, True)
    return compact


def scatter_tiles(compact, kept, block, out):
    """Write gather_tiles' compact copy back into the kept tiles of out (M, K); returns out."""
    _launch(out, compact, kept, block, False)
    return out
