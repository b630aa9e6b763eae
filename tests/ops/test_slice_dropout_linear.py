"""Slice dropout before a linear layer against the dense reference under the same window: forward,
every gradient, the window's shape and statistics, reproducibility, what backward saves, and bad
inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from slicecompile import (
    SliceWindow,
    draw_slice_window,
    dropout_linear,
    slice_dropout_linear,
    slice_dropout_linear_with_window,
)
from slicecompile.ops.slice_dropout_linear import slice_unit

from conftest import DEVICE
from test_input_dropout_linear import (
    EMPTY_SHAPES,
    check_against_reference,
    check_exactly_like,
    check_shapes_propagate,
    linear_inputs,
)


def _reference(x, w, b, window):
    """The element-wise definition: every feature multiplied by its mask factor."""
    return F.linear(x * window.features(x.device).to(x.dtype), w, b)


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
    x, w, b = linear_inputs(lead, K, N, dtype, bias)
    check_against_reference(x, w, b, draw_slice_window(K, p), slice_dropout_linear_with_window, _reference)


def _kept(window):
    return (window.features() != 0).nonzero().flatten().tolist()


@pytest.mark.parametrize("K, p, unit", [(12, 0.4, 1), (1024, 0.3, 64), (256, 0.5, 32), (200, 0.75, 8)])
def test_window_is_one_aligned_cyclic_slice(K, p, unit):
    assert slice_unit(K) == unit
    units = K // unit
    torch.manual_seed(0)
    for _ in range(50):
        window = draw_slice_window(K, p)
        start, width = window.window.tolist()
        assert start % unit == 0 and width % unit == 0
        assert width // unit in (math.floor((1 - p) * units), math.ceil((1 - p) * units)), (
            "floor or ceil of (1-p) units"
        )
        assert _kept(window) == sorted((start + i) % K for i in range(width))


@pytest.mark.parametrize("window, p", [((224, 128), 0.5), ((0, 256), 0.0), ((96, 0), 0.5), ((255, 1), 0.9)])
def test_wrapping_full_and_empty_windows(window, p):
    """The window as two views (wrapping), the whole input, and no feature at all."""
    x = torch.randn(5, 256, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 256, device=DEVICE, requires_grad=True)
    b = torch.randn(3, device=DEVICE, requires_grad=True)
    mask = SliceWindow(torch.tensor(window), 256, p)
    y = slice_dropout_linear_with_window(x, w, b, mask)
    y.backward(grad := torch.randn_like(y))
    copies = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.linear(copies[0] * mask.features(DEVICE).double(), copies[1], copies[2])
    ref.backward(grad.double())
    for actual, expected in zip((y, x.grad, w.grad, b.grad), [ref] + [c.grad for c in copies], strict=True):
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-4)


def test_unbiased_and_p_honoured_for_every_feature():
    """Each feature's factor averages 1 (the output is unbiased) and each is kept with
    probability 1-p, including a fractional width (6.5 of 10 features)."""
    torch.manual_seed(0)
    draws = torch.stack([draw_slice_window(10, 0.35).features() for _ in range(4000)])
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
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = slice_dropout_linear(x, w, p=0.5)
    activations = [t for t in saved if t is not w and t.dim() == 2]
    assert [tuple(t.shape) for t in activations] == [(64, 128)], "x's kept half, never x itself"
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in saved)
    y.sum().backward()
    assert (x.grad != 0).any(dim=0).sum() == 128, "dx is zero outside the window"


def test_eval_and_p0_are_exactly_linear():
    x, w, b = torch.randn(4, 30, device=DEVICE), torch.randn(7, 30, device=DEVICE), torch.randn(7, device=DEVICE)
    assert torch.equal(slice_dropout_linear(x, w, b, p=0.5, training=False), F.linear(x, w, b))
    assert torch.equal(slice_dropout_linear(x, w, b, p=0.0), F.linear(x, w, b))


def test_compiles_without_graph_breaks():
    x, w = torch.randn(8, 64, device=DEVICE), torch.randn(16, 64, device=DEVICE)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, w: slice_dropout_linear(x, w, p=0.3), backend=backend, fullgraph=True)
        torch.manual_seed(5)
        expected = slice_dropout_linear(x, w, p=0.3)
        torch.manual_seed(5)
        torch.testing.assert_close(compiled(x, w), expected)
        outputs = [compiled(x, w) for _ in range(4)]
        assert any(not torch.equal(out, outputs[0]) for out in outputs[1:]), "a fresh window every call"


@pytest.mark.gpu
def test_refuses_cuda_graph_capture():
    x, w = torch.randn(8, 64, device="cuda"), torch.randn(16, 64, device="cuda")
    slice_dropout_linear(x, w, p=0.5)  # warm-up outside the capture
    with pytest.raises(RuntimeError, match="CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            slice_dropout_linear(x, w, p=0.5)


def test_bad_inputs():
    x, w = torch.randn(4, 30, device=DEVICE), torch.randn(7, 30, device=DEVICE)
    with pytest.raises(ValueError, match="p must be in"):
        slice_dropout_linear(x, w, p=1.0)
    with pytest.raises(ValueError, match=r"^p must be in \[0, 1\), got -0.5$"):
        slice_dropout_linear(x, w, p=-0.5)
    with pytest.raises(ValueError, match="in_features must be a non-negative int, got -1"):
        draw_slice_window(-1, 0.5)
    with pytest.raises(TypeError, match="in_features must be a non-negative int, got 3.0"):
        draw_slice_window(3.0, 0.5)
    with pytest.raises(ValueError, match="covers 20 features"):
        slice_dropout_linear_with_window(x, w, None, draw_slice_window(20, 0.5))
    with pytest.raises(ValueError, match="wider than"):
        slice_dropout_linear_with_window(x, w, None, SliceWindow(torch.tensor([0, 30]), 30, 0.5))
    with pytest.raises(ValueError, match="start"):
        slice_dropout_linear_with_window(x, w, None, SliceWindow(torch.tensor([30, 2]), 30, 0.5))
    with pytest.raises(ValueError, match="the window's width -2 is negative"):
        slice_dropout_linear_with_window(x, w, None, SliceWindow(torch.tensor([3, -2]), 30, 0.5))
    with pytest.raises(ValueError, match=r"^p must be in \[0, 1\), got -0.5$"):
        slice_dropout_linear_with_window(x, w, None, SliceWindow(torch.tensor([0, 15]), 30, -0.5))
    with pytest.raises(TypeError, match="window must be a SliceWindow, got Tensor"):
        slice_dropout_linear_with_window(x, w, None, torch.tensor([0, 15]))
    with pytest.raises(ValueError, match="policy"):
        dropout_linear(x, w, p=0.5, policy="columns")


def test_zero_features_give_the_empty_window():
    window = draw_slice_window(0, 0.5)
    assert window.window.tolist() == [0, 0] and window.features().shape == (0,)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead, K, N", EMPTY_SHAPES.values(), ids=EMPTY_SHAPES.keys())
@pytest.mark.parametrize(
    "op",
    [
        lambda x, w, b: slice_dropout_linear(x, w, b, p=0.4),
        lambda x, w, b: slice_dropout_linear_with_window(x, w, b, draw_slice_window(x.shape[-1], 0.4)),
    ],
    ids=["drawn", "with a window"],
)
def test_empty_inputs_give_what_linear_gives(op, lead, K, N, dtype, bias):
    check_exactly_like(op, F.linear, lead, K, N, dtype, bias)


@pytest.mark.parametrize("kind", ["meta", "fake"])
@pytest.mark.parametrize(
    "op",
    [
        lambda x, w, b: slice_dropout_linear(x, w, b, p=0.5),
        lambda x, w, b: slice_dropout_linear_with_window(x, w, b, draw_slice_window(32, 0.5)),
    ],
    ids=["drawn", "with a window"],
)
def test_meta_and_fake_tensors_propagate_shapes(op, kind):
    check_shapes_propagate(kind, op, F.linear, (2, 3, 32), (8, 32), (8,))


def test_activation_checkpointing_recomputes_the_same_window():
    """torch.utils.checkpoint restores the CPU generator before recomputing, so the recomputed
    forward draws the window the first forward drew: gradients equal the plain run's."""
    x = torch.randn(4, 4096, device=DEVICE, requires_grad=True)  # 64 window starts: a fresh draw
    w = torch.randn(8, 4096, device=DEVICE, requires_grad=True)  # would differ 63 times in 64
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(11)
        if checkpointed:
            y = torch.utils.checkpoint.checkpoint(slice_dropout_linear, x, w, None, 0.5, use_reentrant=False)
        else:
            y = slice_dropout_linear(x, w, None, 0.5)
        grads.append(torch.autograd.grad(y.square().sum(), (x, w)))
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.equal(plain, recomputed)
