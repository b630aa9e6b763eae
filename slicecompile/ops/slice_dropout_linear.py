"""Slice dropout (SliceOut's policy) before a linear layer: each call keeps one contiguous window
of input features, the same for every row, and drops the rest.

The window starts at a uniformly drawn aligned feature (a multiple of `unit`, slice_unit) and
wraps around the end, so every feature is kept with the same probability. Its width is a whole
number of units, floor or ceil of (1-p)·units, drawn so that E[width] = (1-p)·in_features exactly;
kept values are scaled by 1/(1-p), so the output is unbiased.

The GEMMs are cuBLAS on strided views of the window, with the scale folded into the GEMM's alpha:
Y = s·X[:, window] W[:, window]ᵀ + b, dX[:, window] = s·dY W[:, window] (zeros elsewhere),
dW[:, window] = s·dYᵀ X[:, window] (zeros elsewhere). A window that wraps is two views and two
GEMMs. Backward saves one compact copy of the window of x (what it needs, about (1-p) of x) and
nothing element-wise.

Views need the window's start and width as host integers, so the window is drawn by torch's
CPU generator (torch.manual_seed reproduces it; no device synchronisation) in its own op, and
travels to the GEMM ops as a 2-element CPU tensor. A CUDA graph would replay the window it was
captured with: the ops refuse to be captured, and their cudagraph_unsafe tag keeps them out of
the CUDA graphs torch.compile makes (with Inductor's graph partitioning the rest of the graph is
still captured). Inside a CUDA graph captured by hand, use policy="block".
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import is_fake

from .checks import check_linear_operands, check_p, check_type
from .masks import flattened_rows

# Windows start at multiples of the largest of these that divides in_features and leaves at
# least MIN_UNITS positions: 64 bf16 features are 128 bytes, so every view is aligned for cuBLAS.
UNITS = (64, 32, 16, 8, 4, 2, 1)
MIN_UNITS = 8
# Every op reads the window on the host; only the draw is random.
_HOST_WINDOW = tuple(getattr(torch.Tag, name) for name in ("cudagraph_unsafe",) if hasattr(torch.Tag, name))
_RANDOM = (torch.Tag.nondeterministic_seeded, *_HOST_WINDOW)


def slice_unit(in_features):
    """The alignment (in features) of window starts and widths for in_features features."""
    for unit in UNITS:
        if in_features % unit == 0 and in_features // unit >= MIN_UNITS:
            return unit
    return 1


def max_width(in_features, p):
    """The widest window drawn for (in_features, p): the size of the saved copy."""
    unit = slice_unit(in_features)
    return math.ceil((1.0 - p) * (in_features // unit)) * unit


@dataclass(frozen=True)
class SliceWindow:
    """window: (2,) int64 CPU tensor [start, width]; features [start, start + width) modulo
    in_features are kept and scaled by 1/(1-p)."""

    window: Tensor
    in_features: int
    p: float

    def pieces(self):
        """The window as (first feature, end feature, offset in the window) of at most two views."""
        return _pieces(*self.window.tolist(), self.in_features)

    def features(self, device=None):
        """(in_features,) float32 multiplier of each input feature: the dense form of the mask."""
        dense = torch.zeros(self.in_features, dtype=torch.float32, device="cpu")
        for first, end, _ in self.pieces():
            dense[first:end] = 1.0 / (1.0 - self.p)
        return dense.to(device)


def _pieces(start, width, in_features):
    head = min(width, in_features - start)
    pieces = [(start, start + head, 0)] if head else []
    return pieces + ([(0, width - head, head)] if width > head else [])


def _draw_impl(in_features: int, p: float, *, device: torch.device) -> Tensor:
    """device: always the CPU, the generator drawn from. It is an argument so that
    activation checkpointing under torch.compile, which replays a random op's generator state
    to recompute it, finds the generator's device (rng_prims reads a `device` keyword)."""
    unit = slice_unit(in_features)
    units = in_features // unit
    kept = (1.0 - p) * units
    u_start, u_width = torch.rand(2, dtype=torch.float64, device="cpu").tolist()  # no device sync
    start = min(int(u_start * units), max(units - 1, 0)) * unit  # no features: the window [0, 0)
    width = (math.floor(kept) + int(u_width < kept - math.floor(kept))) * unit
    return torch.tensor([start, width], dtype=torch.int64, device="cpu")


_draw = torch.library.custom_op("slicecompile::draw_slice_window", _draw_impl, mutates_args=(), tags=_RANDOM)


@_draw.register_fake
def _(in_features, p, *, device):
    return torch.empty(2, dtype=torch.int64, device="cpu")


def draw_slice_window(in_features, p):
    """A SliceWindow over in_features features, dropping each with probability p (0 <= p < 1);
    zero features give the empty window."""
    if isinstance(in_features, bool) or not isinstance(in_features, int):
        raise TypeError(f"in_features must be a non-negative int, got {in_features!r}")
    if in_features < 0:
        raise ValueError(f"in_features must be a non-negative int, got {in_features}")
    check_p(p)
    # Traced (torch.compile, or fake tensors), the op: its draw has no values to read. Eager, the
    # function itself, as the op's dispatch costs the host.
    traced = torch.compiler.is_compiling() or detect_fake_mode() is not None
    draw = _draw if traced else _draw_impl
    return SliceWindow(draw(in_features, float(p), device=torch.device("cpu")), in_features, float(p))


def _refuse_capture(t):
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "policy='slice' draws its window on the host, so a CUDA graph would replay one window "
            "forever; use policy='block' inside a CUDA graph captured by hand (torch.compile keeps this op "
            "out of its CUDA graphs)"
        )


def _window(window, in_features):
    """(kept pieces, dropped pieces) of a window tensor, each as _pieces gives them."""
    start, width = window.tolist()
    after = (start + width) % in_features if in_features else 0
    dropped = _pieces(after, in_features - width, in_features)
    return _pieces(start, width, in_features), [(first, end) for first, end, _ in dropped]


def _scaled_product(out, a, b, scale, accumulate=None):
    """out = scale · a @ b (+ accumulate) into an out that holds garbage (fresh from new_empty),
    which no op reads: addmm(out, ..., beta=0) would hand it to the GEMM as its input. The input
    is the bias (accumulate) or a real zero. cuBLAS never reads its input when beta = 0, so on a
    GPU the zero costs nothing and the scale stays the GEMM's alpha; elsewhere the zero is first
    copied into out (beta = 1), so that a BLAS that mishandles beta = 0 still sees no garbage."""
    if accumulate is not None:
        return torch.addmm(accumulate, a, b, alpha=scale, out=out)
    zero = out.new_zeros(()).expand_as(out)
    return torch.addmm(zero, a, b, beta=0 if out.is_cuda else 1, alpha=scale, out=out)


def _copy_window(x, pieces, kept):
    """x's window into kept, zeros past its width. All of kept is written before a GEMM reads a
    view of it: a BLAS may read a view's rows past its last column (oneDNN's AMX bfloat16 kernels
    load whole K tiles and rely on the other operand's zeros there, which NaN · 0 defeats)."""
    width = 0
    for first, end, offset in pieces:
        kept[:, offset : offset + end - first].copy_(x[:, first:end])
        width += end - first
    kept[:, width:].zero_()


def _forward_impl(x: Tensor, weight: Tensor, bias: Tensor | None, window: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(y, the window of x copied compactly, (rows, max_width), zeros past the window's width)."""
    _refuse_capture(x)
    kept = x.new_empty(x.shape[0], max_width(x.shape[1], p))
    y = x.new_empty(x.shape[0], weight.shape[0])
    pieces, _ = _window(window, x.shape[1])
    _copy_window(x, pieces, kept)
    if not pieces:  # an empty window: every feature dropped
        return (y.zero_() if bias is None else y.copy_(bias.expand_as(y))), kept
    accumulate = None if bias is None else bias.expand_as(y)
    for first, end, offset in pieces:
        part = kept[:, offset : offset + end - first]
        _scaled_product(y, part, weight[:, first:end].t(), 1.0 / (1.0 - p), accumulate)
        accumulate = y
    return y, kept


_forward = torch.library.custom_op(
    "slicecompile::slice_dropout_linear", _forward_impl, mutates_args=(), tags=_HOST_WINDOW
)


@_forward.register_fake
def _(x, weight, bias, window, p):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], max_width(x.shape[1], p))


def _grad_input_impl(grad_out: Tensor, weight: Tensor, window: Tensor, p: float) -> Tensor:
    """s·dY W on the window, zeros elsewhere: (rows, in_features)."""
    _refuse_capture(grad_out)
    grad_x = grad_out.new_empty(grad_out.shape[0], weight.shape[1])
    pieces, dropped = _window(window, weight.shape[1])
    for first, end, _ in pieces:
        _scaled_product(grad_x[:, first:end], grad_out, weight[:, first:end], 1.0 / (1.0 - p))
    for first, end in dropped:
        grad_x[:, first:end].zero_()
    return grad_x


_grad_input = torch.library.custom_op(
    "slicecompile::slice_dropout_linear_grad_input", _grad_input_impl, mutates_args=(), tags=_HOST_WINDOW
)


@_grad_input.register_fake
def _(grad_out, weight, window, p):
    return grad_out.new_empty(grad_out.shape[0], weight.shape[1])


def _grad_weight_impl(grad_out: Tensor, kept: Tensor, window: Tensor, in_features: int, p: float) -> Tensor:
    """s·dYᵀ X on the window, zeros elsewhere: (out_features, in_features)."""
    _refuse_capture(grad_out)
    grad_w = grad_out.new_empty(grad_out.shape[1], in_features)
    pieces, dropped = _window(window, in_features)
    for first, end, offset in pieces:
        _scaled_product(grad_w[:, first:end], grad_out.t(), kept[:, offset : offset + end - first], 1.0 / (1.0 - p))
    for first, end in dropped:
        grad_w[:, first:end].zero_()
    return grad_w


_grad_weight = torch.library.custom_op(
    "slicecompile::slice_dropout_linear_grad_weight", _grad_weight_impl, mutates_args=(), tags=_HOST_WINDOW
)


@_grad_weight.register_fake
def _(grad_out, kept, window, in_features, p):
    return grad_out.new_empty(grad_out.shape[1], in_features)


def _setup_context(ctx, inputs, output):
    x, weight, bias, window, p = inputs
    ctx.save_for_backward(weight, window, output[1])
    ctx.in_features, ctx.p, ctx.has_bias = x.shape[1], p, bias is not None


def _gradients(ctx, grad_out, grad_input, grad_weight):
    weight, window, kept = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_input(grad_out, weight, window, ctx.p)
    if ctx.needs_input_grad[1]:
        grad_w = grad_weight(grad_out, kept, window, ctx.in_features, ctx.p)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_out.sum(0)
    return grad_x, grad_w, grad_b, None, None


_forward.register_autograd(
    lambda ctx, grad_out, _grad_kept: _gradients(ctx, grad_out, _grad_input, _grad_weight),
    setup_context=_setup_context,
)


class _EagerSliceLinear(torch.autograd.Function):
    """The same computation without the custom ops' dispatch (tens of microseconds of host time
    per op call; a fifth of the eager op's host time on a 2-core CPU): what eager calls run.
    torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, window, p):
        y, kept = _forward_impl(x, weight, bias, window, p)
        _setup_context(ctx, (x, weight, bias, window, p), (y, kept))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        return _gradients(ctx, grad_out, _grad_input_impl, _grad_weight_impl)


def slice_dropout_linear_with_window(x, weight, bias, window: SliceWindow):
    """F.linear(x ⊙ mask, weight, bias) computed on the kept window only."""
    x, weight, bias = check_linear_operands(x, weight, bias)
    check_type("window", window, SliceWindow)
    check_p(window.p)
    if window.in_features != x.shape[-1]:
        raise ValueError(f"the window covers {window.in_features} features, x has {x.shape[-1]}")
    if not is_fake(window.window):  # a traced window has no values to check
        _check_window_values(window)
    return _under_window(x, weight, bias, window)


def _check_window_values(window):
    start, width = window.window.tolist()
    starts = max(window.in_features, 1)  # zero features: the one window [0, 0)
    if not 0 <= start < starts:
        raise ValueError(f"the window's start {start} is outside [0, {starts})")
    if width < 0:
        raise ValueError(f"the window's width {width} is negative")
    widest = max_width(window.in_features, window.p)
    if width > widest:
        raise ValueError(f"the window's width {width} is wider than p = {window.p} allows ({widest})")


def _under_window(x, weight, bias, window):
    x2d = x.reshape(flattened_rows(x), x.shape[-1])
    if torch.compiler.is_compiling() or is_fake(x2d):
        y, _ = _forward(x2d, weight, bias, window.window, window.p)
    else:
        y = _EagerSliceLinear.apply(x2d, weight, bias, window.window, window.p)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def slice_dropout_linear(x, weight, bias=None, p=0.5, training=True):
    """F.linear(slice_dropout(x), weight, bias); training=False or p = 0 is exactly F.linear."""
    x, weight, bias = check_linear_operands(x, weight, bias)
    check_p(p)
    if not training or p == 0:
        return F.linear(x, weight, bias)
    return _under_window(x, weight, bias, draw_slice_window(x.shape[-1], p))
