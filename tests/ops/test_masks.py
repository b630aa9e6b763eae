import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

from slicecompile import draw_block_mask
from slicecompile.ops.masks import gather_tiles, max_count, scatter_tiles

from conftest import DEVICE

blocks = st.tuples(st.sampled_from([16, 32, 64, 128]), st.sampled_from([16, 32, 64, 128]))


@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 300),
    p=st.floats(0.0, 0.95),
    block=blocks,
    seed=st.integers(0, 2**31 - 1),
)
def test_mask_structure(rows, cols, p, block, seed):
    torch.manual_seed(seed)
    mask = draw_block_mask(rows, cols, p, block, device=DEVICE)
    block_rows, per_row = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    count = int(mask.count.item())
    expected = (1 - p) * per_row
    assert mask.grid == (block_rows, per_row)
    assert math.floor(expected) <= count <= math.ceil(expected)
    assert mask.kept.dtype == torch.int32 and mask.kept.device.type == DEVICE

    tiles = mask.tiles()
    assert tiles.shape == (block_rows, per_row)
    assert (tiles.sum(dim=1) == count).all(), "every block-row keeps the same number of tiles"
    live = mask.kept[:, :count]
    assert (live[:, 1:] > live[:, :-1]).all(), "kept tiles are ascending and distinct"
    assert ((live >= 0) & (live < per_row)).all()
    assert (mask.kept[:, count:] == per_row).all(), "unused slots hold the sentinel"

    elements = mask.elements()
    assert elements.shape == (rows, cols)
    expanded = tiles.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    assert torch.equal(elements, expanded), "the element mask is constant on each tile"

    col_rows, col_count = mask.columns()
    assert torch.equal(col_count, tiles.sum(dim=0, dtype=torch.int32))
    for tile in range(per_row):
        listed = col_rows[tile, : col_count[tile]].long()
        assert torch.equal(listed, tiles[:, tile].nonzero().flatten())


def test_seed_reproduces_the_mask():
    masks = []
    for _ in range(2):
        torch.manual_seed(7)
        masks.append(draw_block_mask(500, 700, 0.3, (32, 64), device=DEVICE))
    assert torch.equal(masks[0].kept, masks[1].kept) and torch.equal(masks[0].count, masks[1].count)
    other = draw_block_mask(500, 700, 0.3, (32, 64), device=DEVICE)
    assert not torch.equal(masks[0].tiles(), other.tiles())


def _keep_rate(rows, cols, p, block, draws):
    torch.manual_seed(0)
    total = torch.zeros(math.ceil(rows / block[0]), math.ceil(cols / block[1]), device=DEVICE)
    for _ in range(draws):
        total += draw_block_mask(rows, cols, p, block, device=DEVICE).tiles()
    return total / draws


def test_p_is_honoured_with_few_tiles():
    """One or two tiles per row: the kept count must be random to keep E[kept] = 1 - p."""
    draws = 4000
    for cols, p in [(16, 0.3), (32, 0.5), (40, 0.1), (16, 0.9)]:
        rate = _keep_rate(64, cols, p, (16, 16), draws)
        sigma = math.sqrt(p * (1 - p) / draws)
        overall = rate.mean().item()
        assert abs(overall - (1 - p)) < 5 * sigma, f"cols={cols} p={p}: kept {overall:.4f}"


def test_every_tile_is_equally_likely():
    draws = 3000
    p = 0.6
    rate = _keep_rate(64, 160, p, (32, 32), draws)  # 5 tiles per row, 2 kept on average
    sigma = math.sqrt(p * (1 - p) / draws)
    assert ((rate - (1 - p)).abs() < 5 * sigma).all(), rate


@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 70),
    p=st.floats(0.05, 0.9),
    block=st.sampled_from([(16, 16), (32, 16), (16, 64)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_compact_copy_round_trip(rows, cols, p, block, seed):
    """scatter(gather(x)) is x under the mask: the compact copy holds exactly the kept tiles."""
    torch.manual_seed(seed)
    x = torch.randn(rows, cols, device=DEVICE)
    mask = draw_block_mask(rows, cols, p, block, device=DEVICE)
    slots = max_count(mask.grid[1], p)
    compact = gather_tiles(x, mask.kept, block, slots)
    assert compact.shape == (rows, slots * block[1])
    assert torch.equal(scatter_tiles(compact, mask.kept, block, x.shape), x * mask.elements())
    assert int(mask.count) <= slots


@pytest.mark.parametrize("rows, cols", [(0, 40), (40, 0), (0, 0)])
def test_zero_sizes_give_a_mask_of_no_tiles(rows, cols):
    mask = draw_block_mask(rows, cols, 0.5, (16, 16), device=DEVICE)
    grid = (math.ceil(rows / 16), math.ceil(cols / 16))
    assert mask.grid == grid and mask.kept.shape[0] == grid[0]
    assert mask.tiles().shape == grid and mask.tiles().numel() == 0
    assert mask.elements().shape == (rows, cols)
    col_rows, col_count = mask.columns()
    assert col_rows.shape == grid[::-1] and col_count.shape == grid[1:]
    x = torch.randn(rows, cols, device=DEVICE)
    compact = gather_tiles(x, mask.kept, mask.block, max_count(grid[1], 0.5))
    assert compact.shape[0] == rows
    assert scatter_tiles(compact, mask.kept, mask.block, x.shape).shape == (rows, cols)


def test_the_draw_compiles_once_for_sizes_that_may_be_zero():
    """Under torch.compile, with sizes that have no value to specialise on (unbacked), the draw
    traces without a guard on them and gives eager's mask at every size, zero included."""
    counter = CompileCounterWithBackend("aot_eager")

    def elements(rows, cols):  # sizes carried by 1-D tensors, whose strides are always (1,)
        return draw_block_mask(rows.shape[0], cols.shape[0], 0.5, (16, 16), device=rows.device).elements()

    compiled = torch.compile(elements, backend=counter, fullgraph=True)
    for sizes in [(40, 48), (0, 48), (40, 0), (7, 5)]:
        rows, cols = (torch.empty(size, device=DEVICE) for size in sizes)
        for t in (rows, cols):
            torch._dynamo.decorators.mark_unbacked(t, 0)
        torch.manual_seed(1)
        expected = elements(rows, cols)
        torch.manual_seed(1)
        assert torch.equal(compiled(rows, cols), expected), sizes
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(rows=-1), ValueError, "rows must be a non-negative int, got -1"),
        (dict(cols=2.0), TypeError, "cols must be a non-negative int, got 2.0"),
        (dict(p=1.0), ValueError, r"p must be in \[0, 1\), got 1.0; p = 1 would drop every input"),
        (dict(p=-0.25), ValueError, r"^p must be in \[0, 1\), got -0.25$"),
        (dict(block=(8, 16)), ValueError, "powers of two"),
    ],
)
def test_bad_draws_raise(change, error, match):
    args = dict(rows=40, cols=48, p=0.5, block=(16, 16)) | change
    with pytest.raises(error, match=match):
        draw_block_mask(**args, device=DEVICE)
