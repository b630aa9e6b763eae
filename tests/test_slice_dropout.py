"""Slice dropout before a linear layer against the dense reference under the same mask: forward,
every gradient, the mask's shape and statistics, reproducibility, what backward saves, and bad
inputs."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from slicecompile import draw_slice_mask, dropout_linear, slice_dropout_linear, slice_dropout_linear_with_mask

from conftest import DEVICE
from tolerance import assert_close


def _reference(x, w, b, mask):
    """The element-wise definition: every feature multiplied by its mask factor."""
    return F.linear(x * mask.features().to(x.dtype), w, b)


@given(
    lead=st.lists(st.integers(1, 40), min_size=1, max_size=3).filter(lambda s: torch.Size(s).numel() <= 300),
    K=st.integers(1, 160),
    N=st.integers(1, 100),
    p=st.floats(0.01, 0.95),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(lead, K, N, p, dtype, bias, seed):
    torch.manual_seed(seed)
    x = torch.randn(*lead, K, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype).requires_grad_()
    b = torch.randn(N, device=DEVICE).to(dtype).requires_grad_() if bias else None
    mask = draw_slice_mask(K, p, device=DEVICE)
    y = slice_dropout_linear_with_mask(x, w, b, mask)
    grad = torch.randn_like(y)
    y.backward(grad)
    leaves = [t for t in (x, w, b) if t is not None]
    results = {}
    for name, wide in (("wide", torch.float64), ("same", dtype)):
        copies = [t.detach().to(wide).requires_grad_() for t in leaves]
        ref = _reference(*copies, *([None] * (3 - len(copies))), mask)
        ref.backward(grad.to(wide))
        results[name] = [ref] + [c.grad for c in copies]
    for i, (actual, what) in enumerate(zip([y] + [t.grad for t in leaves], ["y", "dx", "dw", "db"])):
        assert_close(actual, results["wide"][i], results["same"][i], what)


def test_window_is_one_cyclic_slice():
    torch.manual_seed(0)
    for _ in range(50):
        mask = draw_slice_mask(12, 0.4, device=DEVICE)
        start = int(mask.index[0])
        assert mask.index.tolist() == [(start + i) % 12 for i in range(8)], "8 = ceil(0.6 * 12) consecutive features"
        kept = mask.features() != 0
        assert int(kept.sum()) in (7, 8)


def test_unbiased_and_p_honoured_for_every_feature():
    """Each feature's factor averages 1 (the output is unbiased) and each is kept with
    probability 1-p, including a fractional window (6.5 of 10 features)."""
    torch.manual_seed(0)
    draws = torch.stack([draw_slice_mask(10, 0.35, device=DEVICE).features() for _ in range(4000)])
    assert (draws.mean(0) - 1).abs().max() < 0.06
    assert ((draws != 0).float().mean(0) - 0.65).abs().max() < 0.04


def test_reproducible_from_the_seed():
    x, w = torch.randn(6, 40, device=DEVICE), torch.randn(5, 40, device=DEVICE)
    torch.manual_seed(3)
    first = slice_dropout_linear(x, w, p=0.5)
    torch.manual_seed(3)
    assert torch.equal(slice_dropout_linear(x, w, p=0.5), first)
    torch.manual_seed(3)
    assert torch.equal(dropout_linear(x, w, p=0.5, policy="slice"), first)


def test_backward_saves_only_the_kept_slice():
    x = torch.randn(64, 256, device=DEVICE, requires_grad=True)
    w = torch.randn(32, 256, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = slice_dropout_linear(x, w, p=0.5)
    assert max(saved) == 64 * 128, f"saved sizes {saved}: x's kept half, never x itself"
    y.sum().backward()
    assert (x.grad != 0).any(dim=0).sum() == 128, "dx is zero outside the window"


def test_eval_and_p0_are_exactly_linear():
    x, w, b = torch.randn(4, 30, device=DEVICE), torch.randn(7, 30, device=DEVICE), torch.randn(7, device=DEVICE)
    assert torch.equal(slice_dropout_linear(x, w, b, p=0.5, training=False), F.linear(x, w, b))
    assert torch.equal(slice_dropout_linear(x, w, b, p=0.0), F.linear(x, w, b))


def test_compiles_without_graph_breaks():
    x, w = torch.randn(8, 64, device=DEVICE), torch.randn(16, 64, device=DEVICE)
    compiled = torch.compile(lambda x, w: slice_dropout_linear(x, w, p=0.3), backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    expected = slice_dropout_linear(x, w, p=0.3)
    torch.manual_seed(5)
    torch.testing.assert_close(compiled(x, w), expected)


def test_bad_inputs():
    x, w = torch.randn(4, 30, device=DEVICE), torch.randn(7, 30, device=DEVICE)
    with pytest.raises(ValueError, match="p must be in"):
        slice_dropout_linear(x, w, p=1.0)
    with pytest.raises(ValueError, match="in_features"):
        draw_slice_mask(0, 0.5)
    with pytest.raises(ValueError, match="covers 20 features"):
        slice_dropout_linear_with_mask(x, w, None, draw_slice_mask(20, 0.5, device=DEVICE))
    with pytest.raises(ValueError, match="policy"):
        dropout_linear(x, w, p=0.5, policy="columns")
