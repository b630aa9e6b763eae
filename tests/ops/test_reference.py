"""The reference's hand-written gradients agree with autograd through its forward."""

import torch

from slicecompile import draw_block_mask
from slicecompile.ops import reference


def test_reference_gradients_match_autograd():
    torch.manual_seed(0)
    x = torch.randn(70, 90, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 90, dtype=torch.float64, requires_grad=True)
    b = torch.randn(30, dtype=torch.float64, requires_grad=True)
    mask = draw_block_mask(70, 90, 0.4, (32, 16))
    kept = mask.elements()
    y = reference.forward(x, w, b, kept, mask.scale)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(reference.grad_input(dy, w.detach(), kept, mask.scale), x.grad)
    torch.testing.assert_close(reference.grad_weight(dy, x.detach(), kept, mask.scale), w.grad)
    torch.testing.assert_close(reference.grad_bias(dy), b.grad)
    # The definition itself: dropped elements of x get no gradient, kept ones are scaled.
    dense_grad = dy @ w.detach()
    torch.testing.assert_close(x.grad[kept], dense_grad[kept] / 0.6)
    assert (x.grad[~kept] == 0).all()
