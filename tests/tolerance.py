"""One tolerance rule for every comparison: against a float64 reference, the result may be
off by at most twice what PyTorch's own computation in the same dtype is off, plus a small
slack of a few units of rounding.

Without `magnitude` the slack is a few units in the last place of the output's largest value.
For a sum (a GEMM, a reduction) that is wrong when terms cancel: the result is small, but its
rounding error is not, and depends on the order the terms are added in, which a kernel is free
to choose. Error analysis bounds it by the terms themselves (Higham, Accuracy and Stability of
Numerical Algorithms, §3.1): |fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ γₙ Σ |aᵢ||bᵢ|, γₙ ≈ n · u for n terms
accumulated with unit roundoff u. So a caller passes `magnitude`, the float64 result of the same
computation on the absolute values of its operands (Σ|a||b|, elementwise), and `terms`, the
reduction's length, and the slack becomes, element by element,

    ULPS · (eps · |expected| + terms · eps(float32) · magnitude)

the first part for rounding the result to its dtype once, the second for accumulating: the
kernels and PyTorch both accumulate float16, bfloat16 and float32 products in float32 (exact
for 16-bit operands), so the accumulation's eps is float32's whatever the output's dtype.
Scaling by the output's eps instead would allow a bfloat16 result a sign error."""

import torch

ULPS = 4


def assert_close(actual, expected64, torch_same_dtype, what="", magnitude=None, terms=None):
    expected64 = expected64.double()
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert actual.dtype == torch_same_dtype.dtype, f"{what}: dtype {actual.dtype} != {torch_same_dtype.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if actual.numel() == 0:
        return
    err = (actual.double() - expected64).abs()
    torch_err = (torch_same_dtype.double() - expected64).abs().max().item()
    slack = _slack(actual.dtype, expected64, magnitude, terms)
    excess = err - 2 * torch_err - slack
    worst = excess.argmax()
    assert excess.flatten()[worst] <= 0, (
        f"{what}: error {err.flatten()[worst]:.3g} > 2 x torch's {torch_err:.3g} + {_at(slack, worst):.3g} "
        f"at flat index {worst.item()}"
    )


def _slack(dtype, expected64, magnitude, terms):
    eps = torch.finfo(dtype).eps
    if magnitude is None:
        return expected64.new_tensor(ULPS * eps * expected64.abs().max().item())
    if terms is None:
        raise ValueError("magnitude needs terms, the length of the reduction it sums")
    magnitude = magnitude.double()
    if magnitude.shape != expected64.shape:
        raise ValueError(f"magnitude has shape {tuple(magnitude.shape)}, the result {tuple(expected64.shape)}")
    return ULPS * (eps * expected64.abs() + terms * torch.finfo(torch.float32).eps * magnitude)


def _at(slack, index):
    return (slack if slack.dim() == 0 else slack.flatten()[index]).item()
