"""Channel-structured dropout before conv2d against the dense reference under the same mask:
forward, every gradient, the mask's structure and statistics, what backward saves, eval and
p = 0, reproducibility, torch.compile, and bad inputs."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from slicecompile.ops.dropout_conv2d import ChannelMask, draw_channel_mask, dropout_conv2d, dropout_conv2d_with_mask

from conftest import DEVICE
from test_input_dropout_linear import check_shapes_propagate
from tolerance import assert_close

POLICIES = ["block", "slice"]


def _reference(x, w, b, factors, **conv):
    """The element-wise definition: every (sample, channel) multiplied by its mask factor."""
    return F.conv2d(x * factors[:, :, None, None].to(x.dtype), w, b, **conv)


def _per_group_dw(x, w, mask, grad, **conv):
    """PyTorch's dW in x's dtype reduced as the grouped convolution must reduce it (each sample
    group convolves its own copy of the kept weight slices): one reference dW per group, rounded
    to the dtype, summed in float32. With a single group it is the plain reference's dW."""
    total = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for rows in torch.arange(x.shape[0], device=x.device).split(mask.group_size):
        w_copy = w.detach().clone().requires_grad_()
        _reference(x.detach()[rows], w_copy, None, mask.factors()[rows], **conv).backward(grad[rows])
        total += w_copy.grad
    return total.to(w.dtype)


@pytest.mark.parametrize("policy", POLICIES)
@given(
    N=st.integers(1, 10),
    C=st.integers(1, 40),
    H=st.integers(1, 9),
    W=st.integers(1, 9),
    Cout=st.integers(1, 12),
    kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    p=st.floats(0.01, 0.95),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    bias=st.booleans(),
    block_channels=st.integers(1, 16),
    samples_per_group=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
# cuDNN's TF32, on by default for float32 convolutions, served the grouped convolution and not the
# dense reference on an H200: y off by 1.4e-3 against PyTorch's own 4e-7. Compare like with like.
@torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
def test_matches_reference(
    policy, N, C, H, W, Cout, kernel, stride, padding, p, dtype, bias, block_channels, samples_per_group, seed
):
    assume(min(H, W) + 2 * padding >= kernel)
    # PyTorch's own CPU bfloat16 conv2d (torch 2.13) returns uninitialised values in the weight
    # gradient of kernel taps that only ever overlap padding (seen with W = 1, 3x3, padding 1,
    # stride 2): the reference itself is wrong there.
    assume(dtype != torch.bfloat16 or min(H, W) >= kernel)
    conv = {"stride": stride, "padding": padding}
    torch.manual_seed(seed)
    x = torch.randn(N, C, H, W, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(Cout, C, kernel, kernel, device=DEVICE) / (C * kernel**2) ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(Cout, device=DEVICE).to(dtype).requires_grad_() if bias else None
    mask = draw_channel_mask(N, C, p, policy, block_channels, samples_per_group, device=DEVICE)
    y = dropout_conv2d_with_mask(x, w, b, mask, **conv)
    grad = torch.randn_like(y)
    y.backward(grad)
    leaves = [t for t in (x, w, b) if t is not None]
    results = {}
    for name, wide in (("wide", torch.float64), ("same", dtype)):
        copies = [t.detach().to(wide).requires_grad_() for t in leaves]
        ref = _reference(*copies, *([None] * (3 - len(copies))), mask.factors(), **conv)
        ref.backward(grad.to(wide))
        results[name] = [ref] + [c.grad for c in copies]
    # dW's same-dtype baseline reduces per sample group, as one grouped convolution must.
    results["same"][2] = _per_group_dw(x, w, mask, grad, **conv)
    for i, (actual, what) in enumerate(zip([y] + [t.grad for t in leaves], ["y", "dx", "dw", "db"])):
        assert_close(actual, results["wide"][i], results["same"][i], what)


@pytest.mark.parametrize(
    "policy, N, C, block_channels, samples_per_group, p",
    [
        ("block", 5, 21, 8, 2, 0.4),  # ragged N and C: groups of 2, 2, 1; blocks of 8, 8, 5; 1.8 kept
        ("block", 3, 5, 4, 8, 0.7),  # two blocks, 0.6 kept on average
        ("slice", 4, 10, 16, 8, 0.35),  # a window of 6.5 channels on average
    ],
)
def test_unbiased_and_p_honoured_for_every_channel(policy, N, C, block_channels, samples_per_group, p):
    """Every (sample, channel) factor averages 1 (the output is unbiased) and is kept with
    probability 1-p, within four standard errors."""
    draws = 4000
    torch.manual_seed(0)
    factors = torch.stack(
        [draw_channel_mask(N, C, p, policy, block_channels, samples_per_group, DEVICE).factors() for _ in range(draws)]
    )
    assert torch.allclose(factors[factors != 0], torch.tensor(1 / (1 - p)))
    assert (factors.mean(0) - 1).abs().max() < 4 * (p / (1 - p) / draws) ** 0.5
    assert ((factors != 0).float().mean(0) - (1 - p)).abs().max() < 4 * (p * (1 - p) / draws) ** 0.5


def test_block_mask_structure():
    """Whole channel blocks (the last one partial) kept or dropped, the same for every sample of a
    group (the last one ragged), and the same number of blocks in every group."""
    N, C, block_channels, samples_per_group = 7, 21, 8, 3
    torch.manual_seed(0)
    counts = set()
    for _ in range(50):
        kept = draw_channel_mask(N, C, 0.5, "block", block_channels, samples_per_group, DEVICE).factors() != 0
        blocks = kept[:, ::block_channels]  # (N, 3): the first channel of each block
        assert torch.equal(kept, blocks.repeat_interleave(block_channels, 1)[:, :C])
        assert torch.equal(kept, kept[::samples_per_group].repeat_interleave(samples_per_group, 0)[:N])
        per_group = blocks[::samples_per_group].sum(1).unique().tolist()
        assert len(per_group) == 1, f"groups keep {per_group} blocks"
        counts.add(per_group[0])
    assert counts == {1, 2}, "1.5 of 3 blocks kept on average"


def test_slice_mask_is_one_cyclic_window_for_the_batch():
    torch.manual_seed(0)
    starts = set()
    for _ in range(100):
        kept = draw_channel_mask(5, 12, 0.4, "slice", device=DEVICE).factors() != 0
        assert (kept == kept[0]).all(), "one window for every sample"
        assert int(kept[0].sum()) in (7, 8), "8 = ceil(0.6 * 12), the last kept with probability 0.2"
        first = kept[0] & ~kept[0].roll(1)
        assert int(first.sum()) == 1, f"{kept[0].tolist()} is not one cyclic window"
        starts.add(int(first.nonzero()))
    assert starts == set(range(12))


@pytest.mark.parametrize("policy", POLICIES)
def test_backward_saves_only_the_kept_channels(policy):
    x = torch.randn(16, 64, 8, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 64, 3, 3, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropout_conv2d(x, w, padding=1, p=0.5, policy=policy)
    assert max(t.numel() for t in saved) == x.numel() // 2, "x's kept half: 2 of 4 blocks, or 32 of 64 channels"
    assert not any(t.data_ptr() == x.data_ptr() for t in saved), "x itself is never saved"


@pytest.mark.parametrize("policy", POLICIES)
def test_dropped_channels_get_zero_gradient(policy):
    torch.manual_seed(1)
    x = torch.randn(10, 23, 5, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 23, 3, 3, device=DEVICE, requires_grad=True)
    mask = draw_channel_mask(10, 23, 0.6, policy, block_channels=4, samples_per_group=3, device=DEVICE)
    dropout_conv2d_with_mask(x, w, None, mask, padding=1).backward(torch.randn(10, 6, 5, 5, device=DEVICE))
    kept = mask.factors() != 0
    assert torch.equal(x.grad.ne(0).any(dim=(2, 3)), kept), "dx is exactly zero where dropped, only there"
    assert torch.equal(w.grad.ne(0).any(dim=(0, 2, 3)), kept.any(dim=0)), "dw is zero for channels no one kept"


@pytest.mark.parametrize("policy", POLICIES)
def test_eval_and_p0_are_exactly_conv2d(policy):
    x, w = torch.randn(4, 30, 6, 6, device=DEVICE), torch.randn(7, 30, 3, 3, device=DEVICE)
    b = torch.randn(7, device=DEVICE)
    dense = F.conv2d(x, w, b, padding="same")
    assert torch.equal(dropout_conv2d(x, w, b, padding="same", p=0.5, training=False, policy=policy), dense)
    assert torch.equal(dropout_conv2d(x, w, b, padding="same", p=0.0, policy=policy), dense)


@pytest.mark.parametrize("policy", POLICIES)
def test_reproducible_from_the_seed(policy):
    x, w = torch.randn(12, 40, 5, 5, device=DEVICE), torch.randn(8, 40, 3, 3, device=DEVICE)

    def run(seed):
        torch.manual_seed(seed)
        return dropout_conv2d(x, w, p=0.5, policy=policy, block_channels=4)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


@pytest.mark.parametrize("policy", POLICIES)
def test_compiles_without_graph_breaks(policy):
    x = torch.randn(10, 24, 6, 6, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 24, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(8, device=DEVICE, requires_grad=True)

    def step(x, w, b):
        return dropout_conv2d(x, w, b, stride=2, padding=1, p=0.3, policy=policy, block_channels=5, samples_per_group=4)

    results = []
    # cuDNN's TF32 would let the two runs pick convolution algorithms of different precision; the
    # device context is how a default device reaches Dynamo, which then traces some methods differently.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), torch.device(DEVICE):
        for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
            torch.manual_seed(5)
            y = fn(x, w, b)
            grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
            results.append((y, *grads))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_bad_inputs():
    x, w = torch.randn(4, 30, 6, 6, device=DEVICE), torch.randn(7, 30, 3, 3, device=DEVICE)
    cases = [
        (ValueError, "x must be 4-D", lambda: dropout_conv2d(x[0], w)),
        (ValueError, "weight must be 4-D", lambda: dropout_conv2d(x, w[:, :, 0])),
        (ValueError, "x has 30 channels but weight expects in_channels = 15", lambda: dropout_conv2d(x, w[:, :15])),
        (ValueError, r"bias must have shape \(7,\)", lambda: dropout_conv2d(x, w, torch.zeros(6, device=DEVICE))),
        (TypeError, "share one dtype", lambda: dropout_conv2d(x, w.half())),
        (TypeError, "x has dtype torch.float64", lambda: dropout_conv2d(x.double(), w.double())),
        (TypeError, "weight must be a torch.Tensor", lambda: dropout_conv2d(x, w.tolist())),
        (ValueError, "on one device", lambda: dropout_conv2d(x, w.to("meta"))),
        (ValueError, "policy must be one of", lambda: dropout_conv2d(x, w, policy="columns")),
        (ValueError, "block_channels must be a positive int", lambda: dropout_conv2d(x, w, block_channels=0)),
        (TypeError, "samples_per_group must be a positive int", lambda: dropout_conv2d(x, w, samples_per_group=2.0)),
        (ValueError, "p must be in", lambda: dropout_conv2d(x, w, p=1.0)),
        (ValueError, "p must be in", lambda: draw_channel_mask(4, 30, -0.1)),
        (ValueError, r"^p must be in \[0, 1\), got -0.1$", lambda: dropout_conv2d(x, w, p=-0.1)),
        (ValueError, "channels must be a non-negative int, got -1", lambda: draw_channel_mask(4, -1, 0.5)),
        (TypeError, "batch must be a non-negative int, got 4.0", lambda: draw_channel_mask(4.0, 30, 0.5)),
        (TypeError, "mask must be a ChannelMask", lambda: dropout_conv2d_with_mask(x, w, None, torch.ones(4, 30))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    wrong_shape = draw_channel_mask(5, 30, 0.5, device=DEVICE)
    with pytest.raises(ValueError, match=r"the mask covers \(N, C\) = \(5, 30\) but x has \(4, 30\)"):
        dropout_conv2d_with_mask(x, w, None, wrong_shape)
    mask = draw_channel_mask(4, 30, 0.5, device=DEVICE)
    elsewhere = ChannelMask(mask.channels.to("meta"), mask.factor.to("meta"), (4, 30), 4, 0.5, "block")
    with pytest.raises(ValueError, match="the mask is on meta"):
        dropout_conv2d_with_mask(x, w, None, elsewhere)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("N, C", [(0, 21), (5, 0), (0, 0)], ids=["no samples", "no channels", "neither"])
def test_zero_sizes_give_a_mask_of_no_channels(N, C, policy):
    mask = draw_channel_mask(N, C, 0.5, policy, block_channels=4, samples_per_group=3, device=DEVICE)
    assert mask.factors().shape == (N, C)


def _conv_leaves(x_shape, w_shape, dtype, bias):
    torch.manual_seed(0)
    x = torch.randn(x_shape, device=DEVICE).to(dtype).requires_grad_()
    w = torch.randn(w_shape, device=DEVICE).to(dtype).requires_grad_()
    return x, w, torch.randn(w_shape[0], device=DEVICE).to(dtype).requires_grad_() if bias else None


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_mask", [False, True], ids=["drawn", "with a mask"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("x_shape, w_shape", [((0, 21, 5, 5), (6, 21, 3, 3)), ((4, 0, 5, 5), (6, 0, 3, 3))])
def test_empty_inputs_give_what_conv2d_gives(x_shape, w_shape, policy, with_mask, dtype, bias):
    """Dropping channels of an empty x changes nothing: F.conv2d's output and gradients, exactly,
    whatever they are (with no input channels, torch 2.13 returns no output channels)."""
    settings = dict(policy=policy, block_channels=4, samples_per_group=3)
    results = []
    for fn in ("op", "F.conv2d"):
        x, w, b = _conv_leaves(x_shape, w_shape, dtype, bias)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if fn == "F.conv2d":
                y = F.conv2d(x, w, b, padding=1)
            elif with_mask:
                mask = draw_channel_mask(*x_shape[:2], 0.4, **settings, device=DEVICE)
                y = dropout_conv2d_with_mask(x, w, b, mask, padding=1)
            else:
                y = dropout_conv2d(x, w, b, padding=1, p=0.4, **settings)
            y.backward(torch.ones_like(y))
        results.append([y] + [t.grad for t in (x, w, b) if t is not None])
    for actual, expected in zip(*results, strict=True):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)


@pytest.mark.parametrize("kind", ["meta", "fake"])
@pytest.mark.parametrize("policy", POLICIES)
def test_meta_and_fake_tensors_propagate_shapes(policy, kind):
    def op(x, w, b):
        return dropout_conv2d(x, w, b, padding=1, p=0.5, policy=policy, block_channels=4, samples_per_group=3)

    check_shapes_propagate(kind, op, lambda x, w, b: F.conv2d(x, w, b, padding=1), (7, 10, 5, 5), (6, 10, 3, 3), (6,))
