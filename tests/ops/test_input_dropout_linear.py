"""dropout_linear against the dense reference under the same mask: forward, every gradient,
modes, reproducibility, unbiasedness, torch.library registration and bad inputs."""

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import slicecompile.ops.dispatch as dispatch
from slicecompile import draw_block_mask, dropout_linear, dropout_linear_reference, dropout_linear_with_mask
from slicecompile.ops import masks

from conftest import DEVICE
from tolerance import assert_close

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
blocks = st.tuples(st.sampled_from([16, 32, 64]), st.sampled_from([16, 32, 64]))


def linear_inputs(lead, K, N, dtype=torch.float32, bias=True):
    """x (*lead, K), weight (N, K) and bias (N,) or None, leaves requiring grad."""
    x = torch.randn(*lead, K, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype).requires_grad_()
    b = torch.randn(N, device=DEVICE).to(dtype).requires_grad_() if bias else None
    return x, w, b


def check_against_reference(x, w, b, mask, op=dropout_linear_with_mask, reference=dropout_linear_reference):
    """Forward and all gradients of op(x, w, b, mask) versus reference in float64 and in x's
    dtype, under the same mask; returns the op's output. Each is a sum, so the rounding slack
    scales with its terms' magnitude: the reference on |x|, |w|, |b| and |dy| in float64, over
    K (+ the bias) terms for y, N for dx, the M rows for dw and db."""
    y = op(x, w, b, mask)
    grad = torch.randn_like(y)
    y.backward(grad)
    leaves = [t for t in (x, w, b) if t is not None]
    wide = _reference_and_gradients(reference, leaves, mask, grad, torch.float64)
    same = _reference_and_gradients(reference, leaves, mask, grad, x.dtype)
    magnitude = _reference_and_gradients(reference, leaves, mask, grad, torch.float64, torch.abs)
    rows, K, N = math.prod(x.shape[:-1]), x.shape[-1], w.shape[0]
    terms = {"y": K + 1, "dx": N, "dw": rows, "db": rows}
    for i, (actual, name) in enumerate(zip([y] + [t.grad for t in leaves], ["y", "dx", "dw", "db"])):
        assert_close(actual, wide[i], same[i], name, magnitude[i], terms[name])
    return y


def _reference_and_gradients(reference, leaves, mask, grad, dtype, value=None):
    """[reference(x, w, b, mask), dx, dw(, db)] with the leaves and grad in dtype (through value,
    e.g. abs, if given)."""
    value = value or (lambda t: t)
    copies = [value(t.detach().to(dtype)).requires_grad_() for t in leaves]
    ref = reference(*copies, *[None] * (3 - len(copies)), mask)
    ref.backward(value(grad.to(dtype)))
    return [ref] + [c.grad for c in copies]


@given(
    lead=st.lists(st.integers(1, 70), min_size=1, max_size=3).filter(lambda s: torch.Size(s).numel() <= 300),
    K=st.integers(1, 160),
    N=st.integers(1, 100),
    p=st.floats(0.05, 0.9),
    block=blocks,
    dtype=dtypes,
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(lead, K, N, p, block, dtype, bias, seed):
    torch.manual_seed(seed)
    x, w, b = linear_inputs(lead, K, N, dtype, bias)
    mask = draw_block_mask(x.numel() // K, K, p, block, device=DEVICE)
    check_against_reference(x, w, b, mask)


@pytest.mark.parametrize("shape", [(1, 40), (3, 10), (130, 20), (1, 1)], ids=["M=1", "K<tile", "ragged", "1x1"])
def test_edge_shapes(shape):
    torch.manual_seed(0)
    x, w, b = linear_inputs(shape[:1], shape[1], 33, torch.float32)
    check_against_reference(x, w, b, draw_block_mask(shape[0], shape[1], 0.5, (16, 16), device=DEVICE))


def test_non_contiguous_inputs_and_stride_zero_gradient():
    torch.manual_seed(0)
    base = torch.randn(96, 2, 80, device=DEVICE)
    x = base[:, 0, :].requires_grad_()  # rows 160 elements apart
    x.retain_grad()
    w = torch.randn(80, 50, device=DEVICE).t().requires_grad_()  # (50, 80), transposed storage
    mask = draw_block_mask(96, 80, 0.5, (32, 16), device=DEVICE)
    dropout_linear_with_mask(x, w, None, mask).sum().backward()  # .sum() sends an expanded, stride-0 grad
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    dropout_linear_reference(x64, w64, None, mask).sum().backward()
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    dropout_linear_reference(x32, w32, None, mask).sum().backward()
    assert_close(x.grad, x64.grad, x32.grad, "dx")
    assert_close(w.grad, w64.grad, w32.grad, "dw")


def test_seed_reproduces_the_op_and_its_mask():
    x, w, b = linear_inputs((4, 50), 96, 40, torch.float32)
    torch.manual_seed(3)
    y = dropout_linear(x, w, b, p=0.4, block=(16, 32))
    torch.manual_seed(3)
    mask = draw_block_mask(200, 96, 0.4, (16, 32), device=DEVICE)
    torch.manual_seed(3)
    assert torch.equal(y, dropout_linear(x, w, b, p=0.4, block=(16, 32)))
    assert torch.equal(y, dropout_linear_with_mask(x, w, b, mask))


def test_eval_and_p_zero_are_exactly_linear():
    x, w, b = linear_inputs((5, 30), 64, 20, torch.float32)
    expected = F.linear(x, w, b)
    assert torch.equal(dropout_linear(x, w, b, p=0.5, training=False), expected)
    assert torch.equal(dropout_linear(x, w, b, p=0.0), expected)


def test_output_is_unbiased(monkeypatch):
    monkeypatch.setattr(dispatch, "use_kernels", lambda t: False)  # 2000 draws: the fast pure-PyTorch path
    torch.manual_seed(0)
    x, w, _ = linear_inputs((64,), 64, 8, torch.float32, bias=False)
    draws = 2000
    with torch.no_grad():
        mean = sum(dropout_linear(x, w, p=0.5, block=(16, 16)) for _ in range(draws)) / draws
        dense = F.linear(x, w)
        # Each output is a sum of 4 tiles' contributions, each kept with probability 1/2 and doubled.
        tiles = (x.reshape(64, 4, 16)[:, :, None, :] * w.reshape(8, 4, 16).transpose(0, 1)[None]).sum(-1)
        sigma = (tiles.pow(2).sum(1) / draws).sqrt()  # per-output std of the mean (variance of 2·Bern(½)·t is t²)
    assert ((mean - dense).abs() <= 5 * sigma + 1e-5).all()


def test_needs_input_grad_subsets():
    torch.manual_seed(0)
    x = torch.randn(40, 48, device=DEVICE)
    w = torch.randn(24, 48, device=DEVICE, requires_grad=True)
    mask = draw_block_mask(40, 48, 0.5, (16, 16), device=DEVICE)
    dropout_linear_with_mask(x, w, None, mask).sum().backward()
    expected = torch.ones(40, 24, device=DEVICE).t() @ (x * mask.elements()) * mask.scale
    assert_close(w.grad, expected.double(), expected, "dw only")


def test_reference_path_matches_kernels(monkeypatch):
    """The pure-PyTorch path (CPU tensors without the interpreter) gives the kernels' results."""
    torch.manual_seed(0)
    x, w, b = (t.detach() for t in linear_inputs((70,), 90, 30, torch.float32))
    mask = draw_block_mask(70, 90, 0.5, (32, 32), device=DEVICE)
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(dispatch, "use_kernels", lambda t, k=kernels: k)
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = dropout_linear_with_mask(xs, ws, bs, mask)
        y.sum().backward()
        results.append([y, xs.grad, ws.grad, bs.grad])
    for kernel_result, torch_result in zip(*results):
        torch.testing.assert_close(kernel_result, torch_result)


def test_opcheck():
    torch.manual_seed(0)
    x, w, b = linear_inputs((40,), 48, 24, torch.float32)
    mask = draw_block_mask(40, 48, 0.5, (16, 16), device=DEVICE)
    ops = torch.ops.slicecompile
    args = (x, w, b, mask.kept, mask.count, 16, 16, 0.5)
    torch.library.opcheck(ops.block_dropout_linear.default, args)
    dy = torch.randn(40, 24, device=DEVICE)
    tiles, meta = mask.tiles(), (16, 16, 0.5)
    torch.library.opcheck(ops.block_dropout_linear_grad_input.default, (dy, w.detach(), tiles, *meta))
    compact = masks.gather_tiles(x.detach(), mask.kept, mask.block, masks.max_count(mask.grid[1], 0.5))
    rows, count = mask.columns()
    grad_weight_args = (dy, compact, mask.kept, rows, masks.column_slots(mask.slots(), rows), count, 48, *meta)
    torch.library.opcheck(ops.block_dropout_linear_grad_weight.default, grad_weight_args)


def test_compiles_without_graph_break():
    torch.manual_seed(0)
    x, w, b = linear_inputs((2, 40), 64, 32, torch.float32)
    compiled = torch.compile(lambda x, w, b: dropout_linear(x, w, b, p=0.5, block=(16, 16)), fullgraph=True)
    y = compiled(x, w, b)
    y.sum().backward()
    assert y.shape == (2, 40, 32) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    # Inductor draws the mask with its own RNG, so check the structure: dX vanishes on whole tiles.
    zero_tiles = (x.grad.reshape(80, 64) == 0).reshape(5, 16, 4, 16).all(3).all(1)
    nonzero_tiles = (x.grad.reshape(80, 64) != 0).reshape(5, 16, 4, 16).all(3).all(1)
    assert (zero_tiles | nonzero_tiles).all(), "dX is zero or non-zero on whole tiles"
    assert (zero_tiles.sum(1) == zero_tiles.sum(1)[0]).all(), "every block-row drops the same count"


# (argument changed, error, message) for an F.linear-shaped op: tests/test_linear_dropout_op.py uses it too.
BAD_LINEAR_INPUTS = [
    (dict(p=1.0), ValueError, r"p must be in \[0, 1\), got 1.0; p = 1 would drop every input"),
    (dict(p=-0.1), ValueError, r"^p must be in \[0, 1\), got -0.1$"),  # nothing about p = 1
    (dict(p=float("nan")), ValueError, r"^p must be in \[0, 1\), got nan$"),
    (dict(p=torch.tensor(0.5)), TypeError, "p must be a float"),
    (dict(block=(48, 16)), ValueError, "powers of two"),
    (dict(block=(8, 8)), ValueError, "powers of two"),
    (dict(block=(16.0, 16)), TypeError, "block sides must be ints"),
    (dict(block="big"), TypeError, "block must be"),
    (dict(weight=torch.randn(8, 31)), ValueError, "in_features = 31"),
    (dict(x=torch.ones(4, 32, dtype=torch.int64)), TypeError, "x has dtype torch.int64"),
    (dict(weight=torch.randn(8, 32, dtype=torch.float16)), TypeError, "share one dtype"),
    (dict(x=torch.randn(4, 32, dtype=torch.float64)), TypeError, "x has dtype torch.float64"),
    (dict(bias=torch.randn(9)), ValueError, "bias must have shape"),
    (dict(weight=torch.randn(8, 32, 1)), ValueError, "weight must be 2-D"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("change, error, match", BAD_LINEAR_INPUTS)
def test_bad_inputs_raise(change, error, match):
    args = dict(x=torch.randn(4, 32), weight=torch.randn(8, 32), bias=torch.randn(8), p=0.5, block=(16, 16))
    args.update(change)
    args = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    with pytest.raises(error, match=match):
        dropout_linear(**args)


def test_mask_must_fit_the_input():
    x, w, _ = linear_inputs((40,), 48, 24, torch.float32)
    with pytest.raises(ValueError, match="the mask covers"):
        dropout_linear_with_mask(x, w, None, draw_block_mask(41, 48, 0.5, (16, 16), device=DEVICE))
    mask = draw_block_mask(40, 48, 0.5, (16, 16), device=DEVICE)
    with pytest.raises(TypeError, match="mask must be a BlockMask, got Tensor"):
        dropout_linear_with_mask(x, w, None, mask.kept)


# (leading dims of x, in_features, out_features) with a zero somewhere.
EMPTY_SHAPES = {
    "no rows": ((0,), 24, 8),
    "an empty batch dimension": ((3, 0), 24, 8),
    "in_features = 0": ((5,), 0, 8),
    "out_features = 0": ((5,), 24, 0),
    "all empty": ((0,), 0, 0),
}


def check_exactly_like(op, reference, lead, K, N, dtype, bias):
    """op(x, w, b) is reference(x, w, b) exactly (values, shape, dtype), and so are all their
    gradients, without a warning. Each runs after the same torch.manual_seed, so an op and a
    reference that draw a mask draw the same one."""
    results = []
    for fn in (op, reference):
        torch.manual_seed(0)
        x, w, b = linear_inputs(lead, K, N, dtype, bias)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.manual_seed(1)
            y = fn(x, w, b)
            torch.manual_seed(2)
            y.backward(torch.randn_like(y))
        results.append([y] + [t.grad for t in (x, w, b) if t is not None])
    for actual, expected, what in zip(*results, ["y", "dx", "dw", "db"]):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
        assert torch.equal(actual, expected), what


def _rows(x):
    return math.prod(x.shape[:-1])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead, K, N", EMPTY_SHAPES.values(), ids=EMPTY_SHAPES.keys())
@pytest.mark.parametrize(
    "op",
    [
        lambda x, w, b: dropout_linear(x, w, b, p=0.4, block=(16, 16)),
        lambda x, w, b: dropout_linear(x, w, b, p=0.4, policy="slice"),
        lambda x, w, b: dropout_linear_with_mask(x, w, b, draw_block_mask(_rows(x), x.shape[-1], 0.4, 16, DEVICE)),
    ],
    ids=["block policy", "slice policy", "with a mask"],
)
def test_empty_inputs_give_what_linear_gives(op, lead, K, N, dtype, bias):
    """Dropping elements of an empty x changes nothing, and with out_features = 0 nothing depends
    on x: F.linear's output and gradients (K = 0: the bias alone, a (N, 0) weight gradient)."""
    check_exactly_like(op, F.linear, lead, K, N, dtype, bias)


@contextlib.contextmanager
def data_less(kind):
    """The device to make tensors that carry no data on: meta tensors, or fake ones (under
    FakeTensorMode, as torch.compile traces)."""
    if kind == "meta":
        yield "meta"
        return
    with FakeTensorMode():
        yield DEVICE


def check_shapes_propagate(kind, op, reference, *shapes):
    """op on data-less tensors of these shapes returns what reference returns (shape, dtype and
    device), and its backward gives every input a gradient of the input's shape and device."""
    with data_less(kind) as device:
        leaves = [torch.empty(shape, device=device, requires_grad=True) for shape in shapes]
        y, expected = op(*leaves), reference(*leaves)
        assert (y.shape, y.dtype, y.device) == (expected.shape, expected.dtype, expected.device)
        y.sum().backward()
        for t in leaves:
            assert (t.grad.shape, t.grad.device) == (t.shape, t.device)


@pytest.mark.parametrize("kind", ["meta", "fake"])
@pytest.mark.parametrize(
    "op",
    [
        lambda x, w, b: dropout_linear(x, w, b, p=0.5, block=(16, 16)),
        lambda x, w, b: dropout_linear(x, w, b, p=0.5, policy="slice"),
        lambda x, w, b: dropout_linear_with_mask(x, w, b, draw_block_mask(6, 32, 0.5, 16, device=x.device)),
    ],
    ids=["block policy", "slice policy", "with a mask"],
)
def test_meta_and_fake_tensors_propagate_shapes(op, kind):
    check_shapes_propagate(kind, op, F.linear, (2, 3, 32), (8, 32), (8,))


@pytest.mark.gpu
def test_devices_must_match():
    with pytest.raises(ValueError, match="one device"):
        dropout_linear(torch.randn(4, 32, device="cuda"), torch.randn(8, 32, device="cpu"), p=0.5)


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_backward_saves_only_the_kept_tiles_and_the_tile_index(p):
    x, w, b = linear_inputs((4, 32), 64, 20, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout_linear(x, w, b, p=p, block=(16, 16))
    activations = [t for t in saved if t is not w and t.numel() >= x.numel() // 8]
    kept_share = math.ceil((1 - p) * 4) / 4  # of the 4 tiles per block-row
    assert [t.numel() for t in activations] == [x.numel() * kept_share], [tuple(t.shape) for t in saved]
    assert activations[0].dtype == x.dtype, "no element-wise mask is saved"
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in saved), "x is not kept alive"
    assert sum(t.numel() for t in saved) <= x.numel() * kept_share + w.numel() + 64
    y.sum().backward()  # backward works from what was saved


@pytest.mark.gpu
def test_training_step_never_synchronises_with_the_host():
    x, w, b = linear_inputs((8, 512), 1024, 512, torch.bfloat16)
    dropout_linear(x, w, b, p=0.3).sum().backward()  # compile the kernels first
    torch.cuda.set_sync_debug_mode("error")
    try:
        dropout_linear(x, w, b, p=0.3).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
