"""dropout_bmm (the batched op behind the attention rewrite) against the element-wise
reference under the same mask: forward, both gradients, mask structure, registration."""

import pytest
import torch

from slicecompile.ops.dropout_bmm import (
    batched_elements,
    block_dropout_bmm,
    draw_batched_block_mask,
    dropout_bmm_reference,
    dropout_bmm_with_mask,
)

from tolerance import assert_close

BLOCK = (16, 16)


@pytest.mark.parametrize("lead, m, k, n, p", [((3,), 32, 48, 8, 0.5), ((2, 2), 20, 37, 5, 0.3), ((1,), 7, 9, 3, 0.6)])
def test_matches_reference(lead, m, k, n, p):
    torch.manual_seed(0)
    a = torch.randn(*lead, m, k, requires_grad=True)
    b = torch.randn(*lead, k, n, requires_grad=True)
    mask = draw_batched_block_mask(a.numel() // (m * k), m, k, p, BLOCK)
    y = dropout_bmm_with_mask(a, b, mask)
    grads = torch.autograd.grad(y.sum(), [a, b])  # .sum(): a stride-0 gradient
    refs = {}
    for dtype in (torch.float64, torch.float32):
        a_ref, b_ref = (t.detach().to(dtype).requires_grad_() for t in (a, b))
        ref = dropout_bmm_reference(a_ref, b_ref, mask)
        refs[dtype] = [ref, *torch.autograd.grad(ref.sum(), [a_ref, b_ref])]
    for i, actual in enumerate([y, *grads]):
        assert_close(actual, refs[torch.float64][i], refs[torch.float32][i], ["y", "da", "db"][i])


def test_mask_keeps_whole_tiles_per_matrix():
    torch.manual_seed(0)
    batch, m, k, p = 4, 40, 64, 0.5
    mask = draw_batched_block_mask(batch, m, k, p, BLOCK)
    elements = batched_elements(mask.kept, mask.count, (batch, m, k), BLOCK, p)
    assert elements.shape == (batch, m, k)
    tiles = elements[:, ::16, ::16]  # one element per tile
    assert torch.equal(elements, tiles.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :m, :k])
    assert (tiles.sum(dim=2) == mask.count).all()  # every block-row keeps count of the 4 tiles
    assert len({tuple(matrix.flatten().tolist()) for matrix in tiles}) > 1  # each matrix draws its own


def test_same_seed_same_mask():
    masks = []
    for _ in range(2):
        torch.manual_seed(7)
        masks.append(draw_batched_block_mask(3, 24, 40, 0.4, BLOCK))
    assert torch.equal(masks[0].kept, masks[1].kept) and torch.equal(masks[0].count, masks[1].count)


def test_opcheck():
    torch.manual_seed(0)
    a, b = torch.randn(2, 20, 24, requires_grad=True), torch.randn(2, 24, 8, requires_grad=True)
    mask = draw_batched_block_mask(2, 20, 24, 0.5, BLOCK)
    torch.library.opcheck(block_dropout_bmm, (a, b, mask.kept, mask.count, *BLOCK, 0.5))
