"""No op reads memory it did not write, whatever the device and its BLAS.

Two traps, both needed: every floating buffer torch.empty, torch.empty_like and
Tensor.new_empty return holds NaNs, so a kernel or a GEMM that reads garbage poisons the result;
and a dispatch mode records every torch op that reads bytes of such a buffer that no op has
written. The second catches what a BLAS that honours beta = 0 hides: addmm(out, ..., beta=0,
out=out) hands the garbage to the GEMM as its input, which cuBLAS and MKL then ignore, and a
BLAS that mishandles beta = 0 does not. A GEMM operand counts as read over its whole span, first element to last
(row padding included): BLAS kernels read there too (oneDNN's AMX bfloat16 kernels load whole K
tiles and rely on the other operand's zeros past the edge, which NaN · 0 defeats).

Every public op runs forward and backward under both traps; its output and gradients must be
finite and as close to the float64 reference as the same op run on clean memory."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from slicecompile.ops import (
    draw_attention_mask,
    draw_block_mask,
    draw_channel_mask,
    draw_slice_window,
    dropout_attention_reference,
    dropout_attention_with_mask,
    dropout_conv2d,
    dropout_conv2d_with_mask,
    dropout_linear,
    dropout_linear_reference,
    dropout_linear_with_mask,
    linear_dropout,
    linear_dropout_reference,
    linear_dropout_with_mask,
    slice_dropout_linear,
    slice_dropout_linear_with_window,
)

from conftest import DEVICE
from tolerance import assert_close

aten = torch.ops.aten
ALLOCATIONS = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided}
# Ops that read only their tensor arguments' shape, dtype and device.
METADATA_ONLY = ALLOCATIONS | {aten.new_zeros, aten.new_ones, aten.new_full, aten.zeros_like, aten.ones_like}
GEMMS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addmv, aten.mv}


class UnwrittenReads(TorchDispatchMode):
    """Records each torch op that reads bytes of an allocation (ALLOCATIONS, made while the mode is
    on) that no op has written. An op writes the arguments its schema marks as mutated (out=,
    in-place) and reads the others; views read nothing. Custom ops are single ops here, and
    Triton kernels bypass torch: a launch counts as writing every tensor it is handed (the NaNs
    catch what kernels read)."""

    # Triton kernels launched inside a triton_op arrive as a higher-order operator.
    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.written = {}  # storage -> (nbytes,) bool flags, True where an op wrote
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not isinstance(func, torch._ops.OpOverload):  # a kernel launch: it writes what it is handed
            out = func(*args, **kwargs)
            self.mark_written((args, kwargs))
            return out
        arguments = list(_arguments(func, args, kwargs))
        for schema, value in arguments:
            if schema.alias_info is None and func.overloadpacket not in METADATA_ONLY:
                self._check_read(func, schema.name, value)
        out = func(*args, **kwargs)
        for schema, value in arguments:
            if schema.alias_info is not None and schema.alias_info.is_write:
                self.mark_written(value)
        if func.overloadpacket in ALLOCATIONS:
            flags = torch.zeros(out.untyped_storage().nbytes(), dtype=torch.bool, device="cpu")
            self.written[StorageWeakRef(out.untyped_storage())] = flags
        return out

    def mark_written(self, value):
        with _disable_current_modes():
            for t in _tensors(value):
                if (flags := self._flags(t, span=False)) is not None:
                    flags.fill_(True)

    def _check_read(self, func, name, value):
        with _disable_current_modes():
            for t in _tensors(value):
                flags = self._flags(t, span=func.overloadpacket in GEMMS)
                if flags is not None and not flags.all():
                    self.reads.append(f"{func} reads {(~flags).sum()} unwritten bytes of {name} {tuple(t.shape)}")

    def _flags(self, t, span):
        """The flags of the bytes t covers (with span, every byte from its first element to its
        last), or None if its memory is not an allocation the mode saw."""
        flags = self.written.get(StorageWeakRef(t.untyped_storage()))
        if flags is None or t.numel() == 0:
            return None
        size, start = t.element_size(), t.storage_offset() * t.element_size()
        if span:
            last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
            return flags[start : start + (last + 1) * size]
        return flags.as_strided((*t.shape, size), (*(stride * size for stride in t.stride()), 1), start)


def _arguments(func, args, kwargs):
    for i, schema in enumerate(func._schema.arguments):
        yield schema, args[i] if i < len(args) else kwargs.get(schema.name)


def _tensors(value):
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _filled_with_nan(allocate):
    @functools.wraps(allocate)
    def allocate_garbage(*args, **kwargs):
        t = allocate(*args, **kwargs)
        if t.is_floating_point():
            with _disable_current_modes():  # the NaNs are garbage, not a write
                t.fill_(float("nan"))
        return t

    return allocate_garbage


@pytest.fixture
def poisoned(monkeypatch):
    """A function that runs its argument with fresh buffers full of NaNs under UnwrittenReads;
    returns (its result, the reads of unwritten memory)."""
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        monkeypatch.setattr(owner, name, _filled_with_nan(getattr(owner, name)))
    memory = UnwrittenReads()
    for kernel in (JITFunction, InterpretedFunction):
        monkeypatch.setattr(kernel, "run", _writes_its_arguments(kernel.run, memory))

    def run(fn):
        with memory:
            result = fn()
        return result, memory.reads

    return run


def _writes_its_arguments(launch, memory):
    @functools.wraps(launch)
    def run(self, *args, **kwargs):
        with _disable_current_modes():
            result = launch(self, *args, **kwargs)
        memory.mark_written((args, kwargs))
        return result

    return run


P, BLOCK, SEED = 0.41, (16, 16), 3


def _linear_inputs(dtype):
    """(280, 39) -> 17: the shape an uninitialised read in the slice op was reported at (bfloat16)."""
    x, w, b = torch.randn(280, 39, device=DEVICE), torch.randn(17, 39, device=DEVICE) / 39**0.5, torch.randn(17)
    return x.to(dtype), w.to(dtype), b.to(device=DEVICE, dtype=dtype)


def _conv_inputs(dtype):
    x, w = torch.randn(10, 21, 5, 5, device=DEVICE), torch.randn(6, 21, 3, 3, device=DEVICE) / 14
    return x.to(dtype), w.to(dtype), torch.randn(6, device=DEVICE).to(dtype)


def _attention_inputs(dtype):
    q, k, v = (torch.randn(2, 3, length, e, device=DEVICE) for length, e in ((20, 16), (37, 16), (37, 8)))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _slice_reference(x, w, b, window):
    return F.linear(x * window.features(x.device).to(x.dtype), w, b)


def _conv_reference(x, w, b, mask):
    return F.conv2d(x * mask.factors()[:, :, None, None].to(x.dtype), w, b, padding=1)


def _channel_mask(policy):
    return lambda: draw_channel_mask(10, 21, P, policy, block_channels=4, samples_per_group=3, device=DEVICE)


def _conv_op(policy):
    conv = dict(padding=1, p=P, policy=policy, block_channels=4, samples_per_group=3)
    return lambda x, w, b, mask: dropout_conv2d(x, w, b, **conv)


def _input_mask():
    return draw_block_mask(280, 39, P, BLOCK, device=DEVICE)


def _output_mask():
    return draw_block_mask(280, 17, P, BLOCK, device=DEVICE)


def _window():
    return draw_slice_window(39, P)


# name: (inputs, the mask, the op under it, the dense reference under it). An op that draws its
# own mask draws the same one, as every draw follows torch.manual_seed(SEED).
CASES = {
    "dropout_linear": (
        _linear_inputs,
        _input_mask,
        lambda x, w, b, mask: dropout_linear(x, w, b, P, BLOCK),
        dropout_linear_reference,
    ),
    "dropout_linear_with_mask": (_linear_inputs, _input_mask, dropout_linear_with_mask, dropout_linear_reference),
    "dropout_linear, slice policy": (
        _linear_inputs,
        _window,
        lambda x, w, b, window: dropout_linear(x, w, b, P, policy="slice"),
        _slice_reference,
    ),
    "slice_dropout_linear": (
        _linear_inputs,
        _window,
        lambda x, w, b, window: slice_dropout_linear(x, w, b, P),
        _slice_reference,
    ),
    "slice_dropout_linear_with_window": (_linear_inputs, _window, slice_dropout_linear_with_window, _slice_reference),
    "linear_dropout": (
        _linear_inputs,
        _output_mask,
        lambda x, w, b, mask: linear_dropout(x, w, b, P, BLOCK),
        linear_dropout_reference,
    ),
    "linear_dropout_with_mask": (_linear_inputs, _output_mask, linear_dropout_with_mask, linear_dropout_reference),
    # Without a bias, the slice op's forward GEMM has nothing to add: the case addmm(out, beta=0) was.
    "slice_dropout_linear_with_window, no bias": (
        lambda dtype: _linear_inputs(dtype)[:2],
        _window,
        lambda x, w, window: slice_dropout_linear_with_window(x, w, None, window),
        lambda x, w, window: _slice_reference(x, w, None, window),
    ),
    "dropout_linear_with_mask, no bias": (
        lambda dtype: _linear_inputs(dtype)[:2],
        _input_mask,
        lambda x, w, mask: dropout_linear_with_mask(x, w, None, mask),
        lambda x, w, mask: dropout_linear_reference(x, w, None, mask),
    ),
    "linear_dropout_with_mask, no bias": (
        lambda dtype: _linear_inputs(dtype)[:2],
        _output_mask,
        lambda x, w, mask: linear_dropout_with_mask(x, w, None, mask),
        lambda x, w, mask: linear_dropout_reference(x, w, None, mask),
    ),
    "dropout_conv2d, block policy": (_conv_inputs, _channel_mask("block"), _conv_op("block"), _conv_reference),
    "dropout_conv2d, slice policy": (_conv_inputs, _channel_mask("slice"), _conv_op("slice"), _conv_reference),
    "dropout_conv2d_with_mask": (
        _conv_inputs,
        _channel_mask("block"),
        lambda x, w, b, mask: dropout_conv2d_with_mask(x, w, b, mask, padding=1),
        _conv_reference,
    ),
    "dropout_attention_with_mask": (
        _attention_inputs,
        lambda: draw_attention_mask(2, 3, 20, 37, P, BLOCK, device=DEVICE),
        dropout_attention_with_mask,
        dropout_attention_reference,
    ),
}


def _outputs_and_gradients(fn, draw, inputs, grad, dtype=None):
    """[fn(*inputs, mask), *the inputs' gradients], inputs (and grad) in dtype if given; the mask
    is draw() after torch.manual_seed(SEED), and so is whatever fn draws itself."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    torch.manual_seed(SEED)
    mask = draw()
    torch.manual_seed(SEED)
    y = fn(*leaves, mask)
    y.backward(grad.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", CASES)
def test_no_op_reads_memory_it_did_not_write(name, dtype, poisoned):
    make_inputs, draw, op, reference = CASES[name]
    torch.manual_seed(0)
    inputs = make_inputs(dtype)
    grad = torch.randn_like(op(*inputs, draw()))
    clean = _outputs_and_gradients(op, draw, inputs, grad)
    results, reads = poisoned(lambda: _outputs_and_gradients(op, draw, inputs, grad))
    assert not reads, "\n".join(reads)
    wide = _outputs_and_gradients(reference, draw, inputs, grad, torch.float64)
    names = ["y"] + [f"the gradient of input {i}" for i in range(len(inputs))]
    for what, result, expected, baseline in zip(names, results, wide, clean, strict=True):
        assert_close(result, expected, baseline, f"{name}: {what} on poisoned memory")
