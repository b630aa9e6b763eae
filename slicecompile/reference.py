"""Dense reference of block-dropout linear under an explicit mask.

The definition, element-wise: Y = ((X ⊙ M) Wᵀ) · s + b with s = 1 / (1 - p), for X
flattened to (M, K) and M the (M, K) bool mask of a BlockMask's kept tiles. Its gradients,
written out so that the pure-PyTorch path of the op can run them without autograd and tests
can check them against autograd: dX = (dY W) ⊙ M · s, dW = dYᵀ (X ⊙ M) · s, db = Σ_rows dY.
"""


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
    x2d = x.reshape(-1, x.shape[-1])
    y = forward(x2d, weight, bias, mask.elements(), mask.scale)
    return y.reshape(*x.shape[:-1], weight.shape[0])
