"""linear_dropout (block dropout on F.linear's output) against the dense reference under the same
mask: forward, every gradient, mask structure, modes, reproducibility, unbiasedness, saved
tensors, torch.library registration, torch.compile, autocast and bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import slicecompile.ops.dispatch as dispatch
from slicecompile import draw_block_mask, linear_dropout, linear_dropout_reference, linear_dropout_with_mask

from conftest import DEVICE
from test_input_dropout_linear import (
    BAD_LINEAR_INPUTS,
    EMPTY_SHAPES,
    check_against_reference,
    check_exactly_like,
    check_shapes_propagate,
    linear_inputs,
)
from tolerance import assert_close

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
blocks = st.tuples(st.sampled_from([16, 32]), st.sampled_from([16, 32]))


def _check_against_reference(x, w, b, mask):
    """Forward and all gradients of the op versus the float64 and same-dtype references; dropped
    output tiles are exactly zero."""
    y = check_against_reference(x, w, b, mask, linear_dropout_with_mask, linear_dropout_reference)
    assert (y.reshape(mask.shape)[~mask.elements()] == 0).all(), "dropped tiles are zeros"


@given(
    lead=st.lists(st.integers(1, 70), min_size=1, max_size=3).filter(lambda s: torch.Size(s).numel() <= 200),
    K=st.integers(1, 100),
    N=st.integers(1, 160),
    p=st.floats(0.05, 0.9),
    block=blocks,
    dtype=dtypes,
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(lead, K, N, p, block, dtype, bias, seed):
    torch.manual_seed(seed)
    x, w, b = linear_inputs(lead, K, N, dtype, bias)
    mask = draw_block_mask(x.numel() // K, N, p, block, device=DEVICE)
    _check_against_reference(x, w, b, mask)


@pytest.mark.parametrize(
    "rows, N", [(1, 40), (3, 10), (70, 33), (1, 1)], ids=["M=1", "N<tile", "ragged rows and N", "1x1"]
)
def test_edge_shapes(rows, N):
    torch.manual_seed(0)
    x, w, b = linear_inputs((rows,), 24, N)
    _check_against_reference(x, w, b, draw_block_mask(rows, N, 0.5, (16, 16), device=DEVICE))


def test_output_keeps_whole_tiles_and_equal_counts_per_block_row():
    """The op's own draw: y (with a bias, so no kept element is zero) vanishes on whole (BM, BN)
    tiles, every block-row drops the same number, and the kept tiles equal the dense output · s."""
    torch.manual_seed(0)
    x, w, b = (t.detach() for t in linear_inputs((96,), 32, 128))
    b = b + 10  # keeps every kept element away from zero
    y = linear_dropout(x, w, b, p=0.4, block=(32, 32))
    tiles = y.reshape(3, 32, 4, 32).ne(0).all(3).all(1)
    assert torch.equal(y.reshape(3, 32, 4, 32) != 0, tiles[:, None, :, None].expand(3, 32, 4, 32))
    assert (tiles.sum(1) == tiles.sum(1)[0]).all(), "every block-row keeps the same count"
    elements = tiles.repeat_interleave(32, 0).repeat_interleave(32, 1)
    dense = F.linear(x, w, b) / 0.6
    assert_close(y[elements], dense.double()[elements], dense[elements], "kept tiles")


def test_each_element_is_kept_with_probability_one_minus_p():
    """Per element, not only on average: 3 column tiles, p = 0.3, so 2.1 tiles kept per row."""
    torch.manual_seed(0)
    draws, p = 4000, 0.3
    kept = sum(draw_block_mask(32, 48, p, (16, 16), device=DEVICE).elements().double() for _ in range(draws))
    sigma = (p * (1 - p) / draws) ** 0.5
    assert ((kept / draws - (1 - p)).abs() <= 5 * sigma).all()


def test_non_contiguous_inputs_and_stride_zero_gradient():
    torch.manual_seed(0)
    base = torch.randn(48, 2, 40, device=DEVICE)
    x = base[:, 0, :].requires_grad_()  # rows 80 elements apart
    x.retain_grad()
    w = torch.randn(40, 50, device=DEVICE).t().requires_grad_()  # (50, 40), transposed storage
    mask = draw_block_mask(48, 50, 0.5, (32, 16), device=DEVICE)
    linear_dropout_with_mask(x, w, None, mask).sum().backward()  # .sum() sends an expanded, stride-0 grad
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    linear_dropout_reference(x64, w64, None, mask).sum().backward()
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    linear_dropout_reference(x32, w32, None, mask).sum().backward()
    assert_close(x.grad, x64.grad, x32.grad, "dx")
    assert_close(w.grad, w64.grad, w32.grad, "dw")


def test_seed_reproduces_the_op_and_its_mask():
    x, w, b = linear_inputs((2, 25), 32, 48)
    torch.manual_seed(3)
    y = linear_dropout(x, w, b, p=0.4, block=(16, 32))
    torch.manual_seed(3)
    mask = draw_block_mask(50, 48, 0.4, (16, 32), device=DEVICE)
    torch.manual_seed(3)
    assert torch.equal(y, linear_dropout(x, w, b, p=0.4, block=(16, 32)))
    assert torch.equal(y, linear_dropout_with_mask(x, w, b, mask))


def test_eval_and_p_zero_are_exactly_linear():
    x, w, b = linear_inputs((5, 30), 64, 20)
    expected = F.linear(x, w, b)
    assert torch.equal(linear_dropout(x, w, b, p=0.5, training=False), expected)
    assert torch.equal(linear_dropout(x, w, b, p=0.0), expected)


def test_output_is_unbiased(monkeypatch):
    monkeypatch.setattr(dispatch, "use_kernels", lambda t: False)  # 2000 draws: the fast pure-PyTorch path
    torch.manual_seed(0)
    x, w, b = (t.detach() for t in linear_inputs((64,), 32, 48))
    draws = 2000
    mean = sum(linear_dropout(x, w, b, p=0.5, block=(16, 16)) for _ in range(draws)) / draws
    dense = F.linear(x, w, b)
    sigma = dense.abs() / draws**0.5  # each draw is 2·Bern(½)·dense, of standard deviation |dense|
    assert ((mean - dense).abs() <= 5 * sigma + 1e-5).all()


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_needs_input_grad_subsets(needs):
    torch.manual_seed(0)
    x, w, b = (t.detach().requires_grad_(need) for t, need in zip(linear_inputs((40,), 48, 24), needs))
    mask = draw_block_mask(40, 24, 0.5, (16, 16), device=DEVICE)
    grad = torch.randn(40, 24, device=DEVICE)
    linear_dropout_with_mask(x, w, b, mask).backward(grad)
    copies = [t.detach().double().requires_grad_(need) for t, need in zip((x, w, b), needs)]
    linear_dropout_reference(*copies, mask).backward(grad.double())
    for t, copy, need in zip((x, w, b), copies, needs):
        assert (t.grad is not None) == need
        if need:
            assert_close(t.grad, copy.grad, copy.grad.float(), "the only gradient")


def test_reference_path_matches_kernels(monkeypatch):
    """The pure-PyTorch path (CPU tensors without the interpreter) gives the kernels' results."""
    torch.manual_seed(0)
    x, w, b = (t.detach() for t in linear_inputs((70,), 40, 90))
    mask = draw_block_mask(70, 90, 0.5, (32, 32), device=DEVICE)
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(dispatch, "use_kernels", lambda t, k=kernels: k)
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = linear_dropout_with_mask(xs, ws, bs, mask)
        y.sum().backward()
        results.append([y, xs.grad, ws.grad, bs.grad])
    for kernel_result, torch_result in zip(*results):
        torch.testing.assert_close(kernel_result, torch_result)


def test_opcheck():
    torch.manual_seed(0)
    x, w, b = linear_inputs((40,), 48, 24)
    mask = draw_block_mask(40, 24, 0.5, (16, 16), device=DEVICE)
    ops, meta = torch.ops.slicecompile, (16, 16, 0.5)
    torch.library.opcheck(ops.linear_block_dropout.default, (x, w, b, mask.kept, mask.count, *meta))
    dy = torch.randn(40, 24, device=DEVICE)
    torch.library.opcheck(ops.linear_block_dropout_grad_input.default, (dy, w.detach(), mask.kept, mask.count, *meta))
    grad_weight_args = (dy, x.detach(), mask.tiles(), *mask.columns(), *meta)
    torch.library.opcheck(ops.linear_block_dropout_grad_weight.default, grad_weight_args)


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_backward_saves_x_weight_and_the_tile_index_only(p):
    x, w, b = linear_inputs((4, 32), 64, 96)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = linear_dropout(x, w, b, p=p, block=(16, 32))
    shapes = sorted((str(t.dtype), tuple(t.shape)) for t in saved)
    index = [("torch.int32", (1,)), ("torch.int32", (8, 3))]  # count, kept: 128 / 16 block-rows, 96 / 32 tiles
    assert shapes == sorted([("torch.float32", (128, 64)), ("torch.float32", (96, 64))] + index), shapes
    assert {t.data_ptr() for t in saved if t.dtype == x.dtype} == {x.data_ptr(), w.data_ptr()}, "x and w, not copies"
    y.sum().backward()  # backward works from what was saved


def _check_tile_structure(y, block, block_rows, tiles_per_row):
    """y (with the bias shifted away from zero) is zero or non-zero on whole tiles, and every
    block-row keeps the same number."""
    shaped = y.reshape(block_rows, block[0], tiles_per_row, block[1]) != 0
    kept = shaped.all(3).all(1)
    assert torch.equal(shaped, kept[:, None, :, None].expand_as(shaped)), "y vanishes on whole tiles"
    assert (kept.sum(1) == kept.sum(1)[0]).all(), "every block-row keeps the same count"


def test_compiles_without_graph_break_and_matches_eager_mask():
    """aot_eager draws the mask with torch's generator, as eager does: same seed, same mask."""
    torch.manual_seed(0)
    x, w, b = linear_inputs((2, 16), 32, 64)
    compiled = torch.compile(
        lambda x, w, b: linear_dropout(x, w, b, p=0.5, block=(16, 16)), fullgraph=True, backend="aot_eager"
    )
    torch.manual_seed(5)
    y = compiled(x, w, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.manual_seed(5)
    mask = draw_block_mask(32, 64, 0.5, (16, 16), device=DEVICE)
    copies = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = linear_dropout_reference(*copies, mask)
    ref.backward(grad.double())
    for actual, expected, name in zip(
        [y, x.grad, w.grad, b.grad], [ref] + [c.grad for c in copies], "y dx dw db".split()
    ):
        torch.testing.assert_close(actual, expected.float(), msg=name)


def test_compiles_with_inductor():
    """Inductor draws the mask with its own RNG: check the structure and that gradients flow."""
    torch.manual_seed(0)
    x, w, b = linear_inputs((2, 16), 32, 64)
    compiled = torch.compile(lambda x, w, b: linear_dropout(x, w, b + 10, p=0.5, block=(16, 16)), fullgraph=True)
    y = compiled(x, w, b)
    y.sum().backward()
    _check_tile_structure(y.detach(), (16, 16), 2, 4)
    assert all(torch.isfinite(t.grad).all() for t in (x, w, b))
    kept = (y.detach().reshape(32, 64) != 0).float()
    assert_close(b.grad, (kept.sum(0) * 2).double(), kept.sum(0) * 2, "db counts kept rows")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_follows_the_autocast_dtype(dtype):
    """Under autocast the op equals the op on operands cast by hand, as F.linear does, and the
    gradients reach the float32 leaves in float32."""
    x, w, b = linear_inputs((40,), 64, 32)
    with torch.autocast(DEVICE, dtype=dtype):
        assert F.linear(x, w, b).dtype == dtype
        torch.manual_seed(1)
        out = linear_dropout(x, w, b, p=0.5, block=(16, 16))
    torch.manual_seed(1)
    by_hand = linear_dropout(*(t.detach().to(dtype) for t in (x, w, b)), p=0.5, block=(16, 16))
    assert out.dtype == dtype
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
    out.float().square().sum().backward()
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in (x, w, b))


@pytest.mark.parametrize("change, error, match", BAD_LINEAR_INPUTS)
def test_bad_inputs_raise(change, error, match):
    args = dict(x=torch.randn(4, 32), weight=torch.randn(8, 32), bias=torch.randn(8), p=0.5, block=(16, 16))
    args.update(change)
    args = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    with pytest.raises(error, match=match):
        linear_dropout(**args)


def test_mask_must_fit_the_output():
    x, w, _ = linear_inputs((40,), 48, 24)
    with pytest.raises(ValueError, match=r"the mask covers \(40, 48\) but the output flattens to \(40, 24\)"):
        linear_dropout_with_mask(x, w, None, draw_block_mask(40, 48, 0.5, (16, 16), device=DEVICE))
    with pytest.raises(TypeError, match="mask must be a BlockMask, got Tensor"):
        linear_dropout_with_mask(x, w, None, draw_block_mask(40, 24, 0.5, (16, 16), device=DEVICE).count)


def _output_mask(x, w):
    return draw_block_mask(math.prod(x.shape[:-1]), w.shape[0], 0.4, (16, 16), device=x.device)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead, K, N", EMPTY_SHAPES.values(), ids=EMPTY_SHAPES.keys())
@pytest.mark.parametrize(
    "op",
    [
        lambda x, w, b: linear_dropout(x, w, b, p=0.4, block=(16, 16)),
        lambda x, w, b: linear_dropout_with_mask(x, w, b, _output_mask(x, w)),
    ],
    ids=["drawn", "with a mask"],
)
def test_empty_inputs_follow_the_definition(op, lead, K, N, dtype, bias):
    """What the definition, dropout of F.linear's output, gives: F.linear's empty output when there
    are no rows or no out_features; with in_features = 0 the output is the bias alone, and that is
    what the mask drops (the reference draws the op's mask: same seed)."""
    reference = lambda x, w, b: linear_dropout_reference(x, w, b, _output_mask(x, w))  # noqa: E731
    check_exactly_like(op, reference, lead, K, N, dtype, bias)
    if 0 in (math.prod(lead), N):
        check_exactly_like(op, F.linear, lead, K, N, dtype, bias)


@pytest.mark.parametrize("kind", ["meta", "fake"])
@pytest.mark.parametrize(
    "op",
    [
        lambda x, w, b: linear_dropout(x, w, b, p=0.5, block=(16, 16)),
        lambda x, w, b: linear_dropout_with_mask(x, w, b, _output_mask(x, w)),
    ],
    ids=["drawn", "with a mask"],
)
def test_meta_and_fake_tensors_propagate_shapes(op, kind):
    check_shapes_propagate(kind, op, F.linear, (2, 3, 32), (8, 32), (8,))


@pytest.mark.gpu
def test_devices_must_match():
    with pytest.raises(ValueError, match="one device"):
        linear_dropout(torch.randn(4, 32, device="cuda"), torch.randn(8, 32, device="cpu"), p=0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_default_block_on_the_gpu_kernels(dtype):
    """(128, 128) blocks and 16-bit operands: the tensor-memory-accelerator kernels on Hopper."""
    torch.manual_seed(0)
    x, w, b = linear_inputs((2, 200), 264, 392, dtype)
    _check_against_reference(x, w, b, draw_block_mask(400, 392, 0.5, (128, 128), device=DEVICE))


@pytest.mark.gpu
def test_training_step_never_synchronises_with_the_host():
    x, w, b = linear_inputs((8, 512), 512, 1024, torch.bfloat16)
    linear_dropout(x, w, b, p=0.3).sum().backward()  # compile the kernels first
    torch.cuda.set_sync_debug_mode("error")
    try:
        linear_dropout(x, w, b, p=0.3).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
