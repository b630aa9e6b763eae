"""The tolerance rule itself: a sum rounded differently, within error analysis' bound, passes
even when its terms cancel; a wrong result (a sign, a dropped term, ten times the bound) fails,
in float32 and in bfloat16. On the CPU: the rule is arithmetic, whatever the device."""

import pytest
import torch

from tolerance import ULPS, UNIT_ROUNDOFF, assert_close, rounding_noise

EPS32 = torch.finfo(torch.float32).eps


def _cancelling_terms():
    """19 float32 terms whose sum, 1e-3, is tiny next to them (the sum of their magnitudes is
    about 16): dW at K = N = 1 over 19 rows looks like this."""
    generator = torch.Generator().manual_seed(0)
    terms = torch.randn(19, generator=generator, dtype=torch.float64, device="cpu")
    terms[-1] = 1e-3 - terms[:-1].sum()
    return terms.float()


def _sequential_sum(terms):
    """The terms added one by one in float32: a different order from PyTorch's."""
    total = torch.zeros((), dtype=terms.dtype, device=terms.device)
    for term in terms:
        total = total + term
    return total


def _bound(terms):
    return ULPS * len(terms) * EPS32 * terms.double().abs().sum()


def test_a_sum_rounded_in_another_order_passes_although_its_terms_cancel():
    terms = _cancelling_terms()
    exact = terms.double().sum()
    correctly_rounded = exact.float()  # the best float32 answer, as a compensated sum gives
    actual = _sequential_sum(terms)
    error = (actual.double() - exact).abs()
    assert error > 100 * (correctly_rounded.double() - exact).abs(), "the order matters here"
    assert error > ULPS * EPS32 * exact.abs(), "a slack from the result's magnitude would reject it"
    magnitude = terms.double().abs().sum()
    assert_close(actual, exact, correctly_rounded, "reordered sum", magnitude, len(terms))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "wrong",
    [
        lambda terms, exact: -exact,
        lambda terms, exact: exact - terms[3].double(),
        lambda terms, exact: exact + 10 * _bound(terms),
    ],
    ids=["wrong sign", "dropped term", "ten times the bound"],
)
def test_a_wrong_result_fails(wrong, dtype):
    """In bfloat16 too: the accumulation's error is float32's (products of 16-bit numbers are
    accumulated in float32), only the final rounding is bfloat16's."""
    terms = _cancelling_terms()
    exact = terms.double().sum()
    magnitude = terms.double().abs().sum()
    actual = wrong(terms, exact).to(dtype)
    with pytest.raises(AssertionError, match="error"):
        assert_close(actual, exact, exact.to(dtype), "wrong sum", magnitude, len(terms))


def test_elementwise_slack_does_not_borrow_from_a_large_neighbour():
    """Each element is held to its own terms: a large element elsewhere in the result does not
    widen a small one's slack (it did when the slack came from the output's largest value)."""
    exact = torch.tensor([1e-3, 1e3], dtype=torch.float64, device="cpu")
    magnitude = exact.abs()  # one term each: no cancellation
    actual = (exact + torch.tensor([2e-4, 0.0], dtype=torch.float64, device="cpu")).float()  # 20 %: under 4 ulps of 1e3
    with pytest.raises(AssertionError, match="at flat index 0"):
        assert_close(actual, exact, exact.float(), "two sums", magnitude, 1)
    assert_close(exact.float(), exact, exact.float(), "two sums", magnitude, 1)


def test_magnitude_needs_the_number_of_terms():
    exact = torch.ones(3, dtype=torch.float64, device="cpu")
    with pytest.raises(ValueError, match="terms"):
        assert_close(exact.float(), exact, exact.float(), "sum", magnitude=exact)


def test_rounding_noise_follows_the_terms_not_the_result():
    """Monte Carlo arithmetic on the cancelling sum: its noise is of the order of float32's
    rounding of the terms (far above the result's), within the worst-case bound; a sum rounded in
    another order passes with it, a wrong one fails."""
    terms = _cancelling_terms()
    exact = terms.double().sum()
    (noise,) = rounding_noise(lambda: [terms.double().sum()])
    assert 100 * UNIT_ROUNDOFF * exact.abs() < noise <= len(terms) * UNIT_ROUNDOFF * terms.double().abs().sum()
    assert_close(_sequential_sum(terms), exact, exact.float(), "reordered sum", noise=noise)
    with pytest.raises(AssertionError, match="error"):
        assert_close((exact + 10 * _bound(terms)).float(), exact, exact.float(), "wrong sum", noise=noise)


def test_rounding_noise_reaches_the_backward():
    """The perturbations apply to the ops autograd runs too: a gradient through a cancelling sum
    has noise."""
    weights = _cancelling_terms().double().requires_grad_()

    def gradient():
        (grad,) = torch.autograd.grad((weights.sum() * weights).sum(), weights)
        return [grad]

    (noise,) = rounding_noise(gradient)
    assert noise.min() > 0
