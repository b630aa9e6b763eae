"""Dense reference of block-dropout linear under an explicit BlockMask.

The definition, element-wise: Y = ((X ⊙ M) Wᵀ) · s + b with s = 1 / (1 - p), for X
flattened to (M, K). Its gradients, written out so that the pure-PyTorch path of the op
can run them without autograd and tests can check them against autograd:
dX = (dY W) ⊙ M · s, dW = dYᵀ (X ⊙ M) · s, db = Σ_rows dY.
"""


def _masked(x2d, mask):
    return x2d * mask.elements().to(x2d.dtype)


def forward(x2d, weight, bias, mask):
    y = (_masked(x2d, mask) @ weight.t()) * mask.scale
    return y if bias is None else y + bias


def grad_input(grad_out2d, weight, mask):
    return _masked(grad_out2d @ weight, mask) * mask.scale


def grad_weight(grad_out2d, x2d, mask):
    return (grad_out2d.t() @ _masked(x2d, mask)) * mask.scale


def grad_bias(grad_out2d):
    return grad_out2d.sum(dim=0)


def dropout_linear_reference(x, weight, bias, mask):
    """The element-wise definition on x of any leading shape, differentiable by autograd."""
    x2d = x.reshape(-1, x.shape[-1])
    y = forward(x2d, weight, bias, mask)
    return y.reshape(*x.shape[:-1], weight.shape[0])
