"""dropout_bmm (the batched op behind the attention rewrite) against the element-wise
reference under the same mask: forward, both gradients, mask structure, registration."""

import warnings

import pytest
import torch

from slicecompile.ops.dropout_bmm import (
    batched_elements,
    block_dropout_bmm,
    draw_batched_block_mask,
    dropout_bmm_reference,
    dropout_bmm_with_mask,
)

from conftest import DEVICE
from test_input_dropout_linear import check_shapes_propagate
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


def _batched_mask(a):
    return draw_batched_block_mask(a.shape[:-2].numel(), *a.shape[-2:], 0.5, BLOCK, device=a.device)


@pytest.mark.parametrize(
    "lead, m, k, n",
    [((0,), 20, 24, 8), ((2, 0), 20, 24, 8), ((3,), 0, 24, 8), ((3,), 20, 0, 8), ((3,), 20, 24, 0)],
    ids=["no matrices", "an empty batch dimension", "no rows", "no columns", "no outputs"],
)
def test_empty_inputs_give_what_matmul_gives(lead, m, k, n):
    results = []
    for op in (lambda a, b: dropout_bmm_with_mask(a, b, _batched_mask(a)), torch.matmul):
        torch.manual_seed(0)
        a = torch.randn(*lead, m, k, device=DEVICE, requires_grad=True)
        b = torch.randn(*lead, k, n, device=DEVICE, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = op(a, b)
            y.backward(torch.ones_like(y))
        results.append([y, a.grad, b.grad])
    for actual, expected in zip(*results, strict=True):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)


@pytest.mark.parametrize("kind", ["meta", "fake"])
def test_meta_and_fake_tensors_propagate_shapes(kind):
    op = lambda a, b: dropout_bmm_with_mask(a, b, _batched_mask(a))  # noqa: E731
    check_shapes_propagate(kind, op, torch.matmul, (2, 3, 20, 24), (2, 3, 24, 8))


MASK_TOO_LARGE = r"mask covers \(64, 24\) but a's matrices \(1 of \(20, 24\)\) stack to \(32, 24\)"


def test_bad_inputs():
    a, b = torch.randn(2, 20, 24, device=DEVICE), torch.randn(2, 24, 8, device=DEVICE)
    mask = _batched_mask(a)
    cases = [
        (TypeError, "a must be a Tensor, got list", lambda: dropout_bmm_with_mask(a.tolist(), b, mask)),
        (ValueError, "b must have batch dimensions", lambda: dropout_bmm_with_mask(a, b[0], mask)),
        (ValueError, "share their batch dimensions", lambda: dropout_bmm_with_mask(a, b[:1], mask)),
        (ValueError, "a has 24 columns but b has 23 rows", lambda: dropout_bmm_with_mask(a, b[:, :23], mask)),
        (TypeError, "share one dtype", lambda: dropout_bmm_with_mask(a, b.double(), mask)),
        (TypeError, "mask must be a BlockMask, got Tensor", lambda: dropout_bmm_with_mask(a, b, mask.kept)),
        (ValueError, MASK_TOO_LARGE, lambda: dropout_bmm_with_mask(a[:1], b[:1], mask)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
