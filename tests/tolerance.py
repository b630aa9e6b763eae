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
Scaling by the output's eps instead would allow a bfloat16 result a sign error.

Through a whole model the terms of each sum are hidden inside it: there `noise`, from
`rounding_noise`, stands in for `terms · eps · magnitude`. It is Monte Carlo arithmetic (Parker,
Monte Carlo Arithmetic, 1997): the float64 computation run a few times with every op's operands
and results perturbed at random by float32's unit roundoff, its outputs' largest deviation from the
unperturbed run. Rounding errors propagate through the model as these perturbations do, cancelling
where the model's sums cancel, so the deviation measures the model's sensitivity to float32
rounding element by element: large where terms cancel, small where they do not. Then the slack is

    ULPS · (eps · |expected| + noise)"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

ULPS = 4


def assert_close(actual, expected64, torch_same_dtype, what="", magnitude=None, terms=None, noise=None):
    expected64 = expected64.double()
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert actual.dtype == torch_same_dtype.dtype, f"{what}: dtype {actual.dtype} != {torch_same_dtype.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if actual.numel() == 0:
        return
    err = (actual.double() - expected64).abs()
    torch_err = (torch_same_dtype.double() - expected64).abs().max().item()
    slack = _slack(actual.dtype, expected64, magnitude, terms, noise)
    excess = err - 2 * torch_err - slack
    worst = excess.argmax()
    assert excess.flatten()[worst] <= 0, (
        f"{what}: error {err.flatten()[worst]:.3g} > 2 x torch's {torch_err:.3g} + {_at(slack, worst):.3g} "
        f"at flat index {worst.item()}"
    )


def _slack(dtype, expected64, magnitude, terms, noise):
    eps = torch.finfo(dtype).eps
    if noise is not None:
        if magnitude is not None or noise.shape != expected64.shape:
            raise ValueError("noise replaces magnitude and terms, and has the result's shape")
        return ULPS * (eps * expected64.abs() + noise.double())
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


# Ops that sum: their operands are perturbed as well as their results, so that terms cancelling
# inside one sum show as they would under float32 rounding.
SUMS = {"mm", "bmm", "addmm", "baddbmm", "addmv", "mv", "dot", "convolution", "convolution_backward", "sum", "mean",
        "_softmax", "_softmax_backward_data", "_log_softmax", "_log_softmax_backward_data", "native_layer_norm",
        "native_layer_norm_backward", "var_mean", "var"}  # fmt: skip
UNIT_ROUNDOFF = 2.0**-24  # float32's


class _MonteCarloArithmetic(TorchDispatchMode):
    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SUMS:
            args, kwargs = tree_map(self._perturbed, (args, kwargs or {}))
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return out  # views and in-place results keep their aliasing
        return tree_map(self._perturbed, out)

    def _perturbed(self, value):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float64 or not value.numel():
            return value
        uniform = torch.rand(value.shape, generator=self.generator, dtype=torch.float64).to(value.device)
        return value * (1 + UNIT_ROUNDOFF * (2 * uniform - 1))


def rounding_noise(run, samples=4):
    """For run(), a float64 computation returning a list of tensors (or Nones): per tensor, the
    largest deviation from run()'s result over `samples` runs under Monte Carlo arithmetic at
    float32's unit roundoff (see the module's docstring), to pass to assert_close as noise."""
    exact = run()
    noise = [None if t is None else torch.zeros_like(t, dtype=torch.float64) for t in exact]
    for seed in range(samples):
        with _MonteCarloArithmetic(torch.Generator().manual_seed(seed)):
            perturbed = run()
        for i, (t, ref) in enumerate(zip(perturbed, exact, strict=True)):
            if t is not None:
                noise[i] = torch.maximum(noise[i], (t.double() - ref.double()).abs())
    return noise
