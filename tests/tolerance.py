"""One tolerance rule for every comparison: against a float64 reference, the result may be
off by at most twice what PyTorch's own computation in the same dtype is off, plus a small
slack of a few units in the last place of the output's magnitude."""

import torch

ULPS = 4


def assert_close(actual, expected64, torch_same_dtype, what=""):
    expected64 = expected64.double()
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert actual.dtype == torch_same_dtype.dtype, f"{what}: dtype {actual.dtype} != {torch_same_dtype.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected64).abs().max().item()
    torch_err = (torch_same_dtype.double() - expected64).abs().max().item()
    slack = ULPS * torch.finfo(actual.dtype).eps * expected64.abs().max().item()
    assert err <= 2 * torch_err + slack, f"{what}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {slack:.3g}"
