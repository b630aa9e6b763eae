"""sampled_softmax_losses (the sampled softmax on the Triton kernels) against the dense reference
on the same tiles and against sampled_softmax.py's, the torch path it stands in for: the
losses and the gradients to x, weight and bias."""

import pytest
import torch

from slicecompile import select_active_tiles
from slicecompile.ops import sampled_softmax
from slicecompile.ops.sampled_softmax_kernels import sampled_softmax_losses, tile_choosers

from conftest import DEVICE
from test_hashed_linear_cross_entropy import _gradient_magnitudes, _reference_and_gradients, ce_inputs
from tolerance import assert_close


def _losses_and_gradients(losses_of, leaves, target, tiles, block, grad):
    x, w = leaves[:2]
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    bias = copies[2] if len(copies) == 3 else None
    losses = losses_of(copies[0].reshape(-1, x.shape[-1]), copies[1], bias, target, tiles, block, -100)
    losses.backward(grad)
    return [losses.to(x.dtype)] + [c.grad for c in copies]


CASES = [  # lead, E, N, block, active, ignored: N ragged against BN, M against BM throughout
    ((70,), 24, 300, (16, 32), 0.2, 0.3),
    ((3, 25), 40, 200, (32, 16), 0.05, 0.0),  # one tile a block-row: most labels outside the tiles
    ((50,), 16, 129, (64, 128), 1.0, 0.2),  # the default BN, a last tile of one neuron
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead, E, N, block, active, ignored", CASES)
def test_matches_reference_and_torch_path(lead, E, N, block, active, ignored, bias, dtype):
    torch.manual_seed(N + E)
    x, w, b, target = ce_inputs(lead, E, N, dtype, bias, ignored)
    target = target.reshape(-1)
    tiles = select_active_tiles(x, w, target.reshape(lead), active=active, block=block)
    leaves = [t for t in (x, w, b) if t is not None]
    grad = torch.randn(target.shape, device=DEVICE)
    ours = _losses_and_gradients(sampled_softmax_losses, leaves, target, tiles, block, grad)
    torch_path = _losses_and_gradients(sampled_softmax.sampled_softmax_losses, leaves, target, tiles, block, grad)
    flat = [leaves[0].reshape(-1, E), *leaves[1:]]
    wide = _reference_and_gradients(flat, target, tiles, block, "none", grad, torch.float64)
    same = _reference_and_gradients(flat, target, tiles, block, "none", grad, dtype)
    magnitude = _gradient_magnitudes(flat, target, tiles, block, "none", grad)
    m = target.numel()
    assert_close(ours[0], wide[0], same[0], "loss")
    assert_close(ours[0], wide[0], torch_path[0], "loss, against the torch path")
    for i, name in enumerate(["dx", "dw", "db"][: len(leaves)], start=1):
        terms = N if name == "dx" else m
        assert_close(ours[i].reshape(wide[i].shape), wide[i], same[i], name, magnitude[i - 1], terms)
        assert_close(ours[i], torch_path[i].double(), torch_path[i], f"{name}, against the torch path")
    outside = (target >= 0) & (sampled_softmax.label_columns(tiles, target.clamp(min=0), block) < 0)
    assert outside.any() or active == 1.0, "the cases need labels outside their block-row's tiles"


def test_every_row_ignored_has_zero_gradients():
    torch.manual_seed(0)
    x, w, b, target = ce_inputs((40,), 16, 100)
    target.fill_(-100)
    tiles = select_active_tiles(x, w, target, active=0.3, block=(16, 32))
    losses = sampled_softmax_losses(x, w, b, target, tiles, (16, 32), -100)
    (losses.sum() / 0).backward()  # the mean over no rows: a gradient of nan or inf that must vanish
    assert (losses == 0).all() and (x.grad == 0).all() and (w.grad == 0).all() and (b.grad == 0).all()


def test_tile_choosers_list_each_tiles_block_rows_and_slots():
    columns = torch.tensor([[0, 2, 5], [1, 2, 3], [5, 0, 4]], dtype=torch.int32, device=DEVICE)
    block_rows, slots, count = tile_choosers(columns, 7)
    assert count.tolist() == [2, 1, 2, 1, 1, 2, 0] and count.dtype == torch.int32
    expected = {0: [(0, 0), (2, 1)], 1: [(1, 0)], 2: [(0, 1), (1, 1)], 3: [(1, 2)], 4: [(2, 2)], 5: [(0, 2), (2, 0)]}
    for tile, pairs in expected.items():
        n = len(pairs)
        assert list(zip(block_rows[tile, :n].tolist(), slots[tile, :n].tolist())) == pairs
