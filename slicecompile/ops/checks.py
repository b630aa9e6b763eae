"""Argument validation for the public ops: a clear TypeError/ValueError naming what is wrong,
before anything reaches a kernel. Operands are checked as the op computes them: under
torch.autocast, cast to autocast's dtype first, as F.linear and F.conv2d cast theirs."""

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_p(p):
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a float, got {type(p).__name__}")
    if p >= 1.0:
        raise ValueError(
            f"p must be in [0, 1), got {p}; p = 1 would drop every input "
            "(the 1 / (1 - p) scale is undefined): use zeros instead"
        )
    if not p >= 0.0:  # negative, or NaN
        raise ValueError(f"p must be in [0, 1), got {p}")


def check_size(name, value):
    """A size to draw a mask over: a non-negative int, or a symbolic one (torch.compile with
    dynamic shapes), which comes from a tensor's shape and so is never negative."""
    if isinstance(value, torch.SymInt):
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}")


def check_type(name, value, cls):
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")


def check_block(block):
    """A power of two >= 16 per side; an int means a square block. Returns (BM, BK)."""
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise TypeError(f"block must be an int or a pair of ints, got {block!r}")
    for side in block:
        if isinstance(side, bool) or not isinstance(side, int):
            raise TypeError(f"block sides must be ints, got {block!r}")
        if side < 16 or side & (side - 1):
            raise ValueError(f"block sides must be powers of two >= 16, got {tuple(block)}")
    return tuple(block)


def _check_dtype(name, t):
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")


def autocast(tensors):
    """tensors (None allowed) as an autocast-eligible op sees them: with torch.autocast on for
    their device, floating tensors other than float64 (which autocast leaves alone) in its dtype.
    Devices autocast does not know (meta) have it off: asking torch.is_autocast_enabled about
    them raises. Traced tensors are on devices it knows, and Dynamo cannot trace the question
    (torch 2.11), so only eager calls ask it."""
    device = next(t.device.type for t in tensors if isinstance(t, torch.Tensor))
    known = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device)
    if not known or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    eligible = lambda t: isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64  # noqa: E731
    return tuple(t.to(dtype) if eligible(t) else t for t in tensors)


def check_operands(x, weight, bias):
    """x, weight and bias (or None), after autocast: tensors of one supported dtype on one device
    (empty ones included: the ops then return what the dense op returns). Returns them as the op
    computes them."""
    tensors = {"x": x, "weight": weight} | ({} if bias is None else {"bias": bias})
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    tensors = dict(zip(tensors, autocast(tuple(tensors.values()))))
    for name, t in tensors.items():
        _check_dtype(name, t)
    if len({t.dtype for t in tensors.values()}) > 1:
        raise TypeError("x, weight and bias must share one dtype, got " + _describe(tensors, "dtype"))
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError("x, weight and bias must be on one device, got " + _describe(tensors, "device"))
    return tensors["x"], tensors["weight"], tensors.get("bias")


def check_linear_operands(x, weight, bias):
    """F.linear's layout: x (..., in_features), weight (out_features, in_features), bias
    (out_features,). Returns the operands as the op computes them (check_operands)."""
    x, weight, bias = check_operands(x, weight, bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight expects "
            f"in_features = {weight.shape[1]} (weight shape {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return x, weight, bias


def check_mask_fits(mask, cls, shape, device, masked="x"):
    """The mask must be a cls (BlockMask) covering what it masks (x, or the output for dropout
    after the op), flattened to 2-D (shape), on x's device."""
    check_type("mask", mask, cls)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"the mask covers {tuple(mask.shape)} but {masked} flattens to {tuple(shape)}")
    if mask.kept.device != device:
        raise ValueError(f"the mask is on {mask.kept.device} but x is on {device}")


def _describe(tensors, attr):
    return ", ".join(f"{name}: {getattr(t, attr)}" for name, t in tensors.items())
