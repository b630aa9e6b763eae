"""Block masks: which (BM, BK) tiles of a flattened (M, K) input are kept.

Every block-row keeps the same number of tiles, `count`, drawn once per mask so that
E[count] = (1 - p) * tiles_per_row exactly: each tile, and so each element, is kept with
probability 1 - p, even when a row has only one or two tiles. Scaling kept values by
1 / (1 - p) then makes the output unbiased. Everything is drawn on the tensor's device
from torch's generator (torch.manual_seed reproduces it) with static shapes and no host
synchronisation: the tensors' sizes depend only on (M, K, block).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import check_block, check_p, check_size

# (BM, BK) = (128, 128), SparseDrop's tile: GPU time of a p = 0.5 training step at bf16
# (8192, 4096) -> 4096 on an H200 is 0.871 ms, against 1.220 for (64, 64), 1.076 for (128, 64)
# and 0.859 for the coarser (128, 256) (bench/results/dropout_linear_blocks.csv). The output
# side's (BM, BN) = (128, 128) tied with (128, 256) as the fastest of six there (bench/README.md).
DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True)
class BlockMask:
    """kept: (block_rows, tiles_per_row) int32, block-row i keeps K-tiles kept[i, :count]
    in ascending order (entries past count hold the sentinel tiles_per_row);
    count: (1,) int32 on the same device, shared by every block-row."""

    kept: torch.Tensor
    count: torch.Tensor
    shape: tuple  # (M, K) of the flattened input
    block: tuple  # (BM, BK)
    p: float

    @property
    def grid(self):
        """(block_rows, tiles_per_row)."""
        return (-(-self.shape[0] // self.block[0]), -(-self.shape[1] // self.block[1]))

    @property
    def scale(self):
        return 1.0 / (1.0 - self.p)

    def tiles(self):
        """(block_rows, tiles_per_row) bool: True where the tile is kept."""
        return self.slots() >= 0

    def slots(self):
        """(block_rows, tiles_per_row) int32: where in its block-row's list (and so in a compact
        copy, gather_tiles) each kept tile is; -1 where the tile is dropped."""
        rows, cols = self.grid
        table = torch.full((rows, cols + 1), -1, dtype=torch.int32, device=self.kept.device)
        order = torch.arange(self.kept.shape[1], dtype=torch.int32, device=self.kept.device).expand(rows, -1)
        table.scatter_(1, self.kept.long(), order)  # the sentinels land in the extra column
        return table[:, :cols]

    def columns(self):
        """column_index(self.tiles())."""
        return column_index(self.tiles())

    def elements(self):
        """(M, K) bool element-wise mask, for references and tests."""
        return expand_tiles(self.tiles(), self.block, self.shape)


def mask_of(kept, count, shape, block_m, block_k, p):
    """The BlockMask that an op's flat arguments (kept, count, block_m, block_k, p) describe over
    a flattened (M, K) = shape."""
    return BlockMask(kept, count, tuple(shape), (block_m, block_k), p)


def dropout_scale(p):
    """What kept values are multiplied by."""
    return 1.0 / (1.0 - p)


def column_index(tiles):
    """The transposed index of a (block_rows, tiles_per_row) bool table: (tiles_per_row,
    block_rows) int32 block-rows that keep each K-tile, kept rows first and ascending, and
    (tiles_per_row,) int32 counts."""
    rows = torch.sort(tiles.t().to(torch.uint8), dim=1, descending=True, stable=True).indices.to(torch.int32)
    return rows, tiles.sum(dim=0, dtype=torch.int32)


def column_slots(slots, rows):
    """Where each K-tile's block-rows (column_index's rows) hold it in their compact copies:
    (tiles_per_row, block_rows) int32 entries of the slots table (BlockMask.slots), valid up to
    each K-tile's count."""
    return slots.t().gather(1, rows.long())


def expand_tiles(tiles, block, shape):
    """The (M, K) = shape bool element-wise mask of a (block_rows, tiles_per_row) tile table."""
    full = tiles.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[: shape[0], : shape[1]]


def flattened_rows(x):
    """M of x (..., K) flattened to (M, K): the product of its leading sizes (x.numel() // K
    divides by zero when K = 0)."""
    return math.prod(x.shape[:-1])


def draw_block_mask(rows, cols, p, block, device=None, generator=None):
    """Draw a BlockMask over a (rows, cols) input for drop probability 0 <= p < 1.
    rows and cols may be symbolic (torch.compile with dynamic shapes): no size depends on p,
    and nothing branches on a size, so zero rows or columns (a mask of no tiles) need no case
    of their own."""
    check_size("rows", rows)
    check_size("cols", cols)
    check_p(p)
    block = check_block(block)
    block_rows, per_row = -(-rows // block[0]), -(-cols // block[1])
    rng = {} if generator is None else {"generator": generator}
    # One draw per mask: a compiler may run independent draws in any order.
    uniform = torch.rand(block_rows * per_row + 1, device=device, **rng)
    # floor(e + u) with u ~ U[0, 1) is floor(e) or floor(e) + 1, with mean e = (1 - p) * per_row
    # (the int32 conversion truncates, which is floor for these non-negative values).
    # In float64, so that u just below 1 never rounds e + u up to the next integer.
    count = (uniform[-1:].double() + (1.0 - p) * per_row).to(torch.int32)
    order = uniform[:-1].view(block_rows, per_row).argsort(dim=1)
    slots = torch.arange(per_row, device=device)
    kept = torch.where(slots < count, order, per_row).sort(dim=1).values.to(torch.int32)
    return BlockMask(kept, count, (rows, cols), tuple(block), float(p))


def max_count(per_row, p):
    """The most tiles a block-row keeps: ceil((1 - p) * per_row), the width of a compact copy."""
    return min(per_row, math.ceil((1.0 - p) * per_row))


def _tile_index(kept, block, slots):
    rows = kept.shape[0]
    return kept[:, :slots].long().view(rows, 1, slots, 1).expand(rows, block[0], slots, block[1])


def gather_tiles(x2d, kept, block, slots):
    """The first `slots` kept tiles of each block-row of x2d (M, K), side by side: a compact
    (M, slots * BK) copy, zeros in sentinel slots and past x's edges. Torch ops, for CPUs and
    references: on a GPU the forward GEMM writes the same copy as it reads x
    (sparse_input_matmul's compact_out)."""
    (rows, per_row), (bm, bk) = kept.shape, block
    m, k = x2d.shape
    # Zeros to whole tiles, plus one zero tile per row of tiles where the sentinel points.
    tiles = F.pad(x2d, (0, (per_row + 1) * bk - k, 0, rows * bm - m)).view(rows, bm, per_row + 1, bk)
    compact = tiles.gather(2, _tile_index(kept, block, slots)).view(rows * bm, slots * bk)
    return compact[:m]


def scatter_tiles(compact, kept, block, shape):
    """The (M, K) = shape matrix with gather_tiles' compact copy back in its kept tiles and
    zeros elsewhere."""
    (rows, per_row), (bm, bk) = kept.shape, block
    slots = compact.shape[1] // bk
    compact = F.pad(compact, (0, 0, 0, rows * bm - compact.shape[0]))
    full = compact.new_zeros(rows, bm, per_row + 1, bk)  # the extra tile takes the sentinel slots
    full.scatter_(2, _tile_index(kept, block, slots), compact.view(rows, bm, slots, bk))
    return full[:, :, :per_row].reshape(rows * bm, per_row * bk)[: shape[0], : shape[1]]
