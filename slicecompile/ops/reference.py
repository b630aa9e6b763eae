"""Dense references of block-dropout linear, on either side, under an explicit mask.

Input side (dropout_linear), element-wise: Y = ((X ⊙ M) Wᵀ) · s + b with s = 1 / (1 - p), for
X flattened to (M, K) and M the (M, K) bool mask of a BlockMask's kept tiles. Its gradients,
written out so that the pure-PyTorch path of the op can run them without autograd and tests
can check them against autograd: dX = (dY W) ⊙ M · s, dW = dYᵀ (X ⊙ M) · s, db = Σ_rows dY.

Output side (linear_dropout): Y = (X Wᵀ + b) ⊙ M · s with M the (M, N) mask of the output.
With G = dY ⊙ M · s: dX = G W, dW = Gᵀ X, db = Σ_rows G.
"""

import torch.nn.functional as F

from .masks import flattened_rows


def forward(x2d, weight, bias, elements, scale):
    y = (x2d * elements.to(x2d.dtype) @ weight.t()) * scale
    return y if bias is None else y + bias


def grad_input(grad_out2d, weight, elements, scale):
    return (grad_out2d @ weight) * elements.to(grad_out2d.dtype) * scale


def grad_weight(grad_out2d, x2d, elements, scale):
    return (grad_out2d.t() @ (x2d * elements.to(x2d.dtype))) * scale


def grad_bias(grad_out2d):
    return grad_out2d.sum(dim=0)


def dropout_linear_reference(x, weight, bias, mask):
    """The element-wise definition under a BlockMask, on x of any leading shape,
    differentiable by autograd."""
    x2d = x.reshape(flattened_rows(x), x.shape[-1])
    y = forward(x2d, weight, bias, mask.elements(), mask.scale)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def output_forward(x2d, weight, bias, elements, scale):
    return F.linear(x2d, weight, bias) * elements.to(x2d.dtype) * scale


def output_grad_input(grad_out2d, weight, elements, scale):
    return _masked(grad_out2d, elements, scale) @ weight


def output_grad_weight(grad_out2d, x2d, elements, scale):
    return _masked(grad_out2d, elements, scale).t() @ x2d


def _masked(grad_out2d, elements, scale):
    return grad_out2d * elements.to(grad_out2d.dtype) * scale


def linear_dropout_reference(x, weight, bias, mask):
    """The output side's element-wise definition under a BlockMask over the output flattened to
    (rows, out_features), on x of any leading shape, differentiable by autograd."""
    x2d = x.reshape(flattened_rows(x), x.shape[-1])
    y = output_forward(x2d, weight, bias, mask.elements(), mask.scale)
    return y.reshape(*x.shape[:-1], weight.shape[0])
