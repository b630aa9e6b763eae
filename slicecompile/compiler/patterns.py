"""What a dropout site is made of: the named PATTERNS rows (each matmul kind, which argument is
its input operand, and its filter returning a Match or the reason to skip) and the ops followed
between a dropout and its matmul (views, and scalings by a number), forwards from the dropout to
the matmul it feeds (input side) or backwards to the matmul that made its input (output side).
sites.py decides sites with them."""

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.fx import Node

DROPOUT_TARGETS = {F.dropout, torch.dropout, torch.nn.functional.dropout}

# Ops between the dropout and the matmul that only rearrange elements: block dropout is
# defined on the matmul's operand, so any of them may sit in between. Gathers, slices and
# expands are not followed (they drop or duplicate elements).
VIEW_METHODS = {"view", "reshape", "flatten", "unflatten", "transpose", "t", "permute", "contiguous", "squeeze"}
VIEW_METHODS |= {"unsqueeze", "view_as", "reshape_as"}
VIEW_FUNCTIONS = {
    torch.reshape,
    torch.flatten,
    torch.unflatten,
    torch.transpose,
    torch.t,
    torch.permute,
    torch.squeeze,
    torch.unsqueeze,
}


# Scalings by a Python number, followed like views (is_scaling).
SCALE_FUNCTIONS = {operator.mul, torch.mul, operator.truediv, torch.div}
SCALE_METHODS = {"mul", "div"}


class Match(NamedTuple):
    """How a matmul consumes the dropout: F.linear's operands (weight may be a view of the
    matmul's right operand) and the GEMM size."""

    operand: Node
    weight: Node  # (N, K) as in F.linear, or (K, N) when weight_transposed
    weight_transposed: bool
    bias: Node | None
    gemm: tuple
    batched: bool = False  # weight is B of a batched (..., K, N) matmul with the operand's batch dims
    conv: tuple | None = None  # (stride, padding, dilation) of a conv2d; gemm is then its implicit GEMM
    dtype: torch.dtype | None = None  # what the matmul computes in: its output's dtype (autocast's, under autocast)


class Pattern(NamedTuple):
    """A named row: which calls it covers, which argument is the dropped operand, and a
    filter that returns a Match or the reason to skip."""

    name: str
    functions: frozenset
    methods: frozenset
    operand_index: int
    match: Callable  # (node, operand) -> Match | str


def meta_value(node):
    value = node.meta.get("example_value") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def hint(size):
    """A concrete size, without adding a guard: a dynamic size counts at its first-seen value."""
    if isinstance(size, torch.SymInt):
        return size.node.hint if size.node.hint is not None else 0
    return int(size)


def static_size(size):
    """size as an int if it is static, or if the shape environment has pinned it to a constant
    (a dynamic input's in_features, once F.linear has met a static weight), else None."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    expr = size.node.expr  # with the shape environment's replacements applied
    return int(expr) if expr.is_number else None


def dropout_p(dropout):
    """A dropout's p: a number, a symbolic float that the shape environment has pinned to a
    constant (under dynamic=True, a p read inside a checkpointed region: Dynamo cannot retrace
    it as a constant, but guards its value), or the node that computes it."""
    p = arg_of(dropout, 1, "p", 0.5)
    value = p.meta.get("example_value") if isinstance(p, Node) else None
    if isinstance(value, torch.SymFloat) and value.node.expr.is_number:
        return float(value.node.expr)
    return p


def shape_of(node):
    value = meta_value(node)
    return tuple(hint(s) for s in value.shape) if value is not None else ()


def arg_of(node, index, name, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _gemm(operand, right_shape_kn):
    shape = shape_of(operand)
    k, n = right_shape_kn
    m = 1
    for size in shape[:-1]:
        m *= size
    return (m, k, n)


def _match_linear(node, operand):
    weight, bias = arg_of(node, 1, "weight"), arg_of(node, 2, "bias")
    if len(shape_of(weight)) != 2:
        return "no shape information for the weight"
    n, k = shape_of(weight)
    return Match(operand, weight, False, bias, _gemm(operand, (k, n)))


def _match_right_2d(node, operand, right_index=1):
    right = arg_of(node, right_index, "mat2", arg_of(node, right_index, "other"))
    if len(shape_of(operand)) < 2 or len(shape_of(right)) < 2:
        return "matrix-vector product (a 1-D operand)"
    if len(shape_of(right)) != 2:
        return _match_batched(operand, right)
    return Match(operand, right, True, None, _gemm(operand, shape_of(right)))


def _match_addmm(node, operand):
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return "addmm with beta or alpha other than 1"
    match = _match_right_2d(node, operand, right_index=2)
    return match if isinstance(match, str) else match._replace(bias=node.args[0])


def _match_batched(operand, right):
    left_shape, right_shape = shape_of(operand), shape_of(right)
    if len(left_shape) < 3 or len(right_shape) < 3:
        return "batched matmul against a 2-D operand"
    if left_shape[:-2] != right_shape[:-2]:
        return "batched matmul with broadcast batch dims"
    return Match(operand, right, False, None, _gemm(operand, right_shape[-2:]), batched=True)


def _match_conv2d(node, operand):
    weight, bias = arg_of(node, 1, "weight"), arg_of(node, 2, "bias")
    conv = tuple(
        arg_of(node, i, name, default) for i, name, default in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1))
    )
    if arg_of(node, 6, "groups", 1) != 1:
        return "grouped convolution (groups != 1)"
    if not is_dropout(operand):
        return "conv2d input reached through a view or scaling of the dropout"
    if any(isinstance(arg, Node) for arg in conv):
        return "conv2d stride, padding or dilation is not a constant"
    if len(shape_of(operand)) != 4 or len(shape_of(weight)) != 4 or len(shape_of(node)) != 4:
        return "conv2d input is not batched (N, C, H, W)"
    out_channels, in_channels, kernel_h, kernel_w = shape_of(weight)
    batch, _, out_h, out_w = shape_of(node)
    gemm = (batch * out_h * out_w, in_channels * kernel_h * kernel_w, out_channels)
    return Match(operand, weight, False, bias, gemm, conv=conv)


PATTERNS = (
    Pattern("dropout_linear", frozenset({F.linear, torch._C._nn.linear}), frozenset(), 0, _match_linear),
    Pattern(
        "dropout_matmul",
        frozenset({torch.matmul, operator.matmul, torch.Tensor.matmul, torch.mm, torch.Tensor.mm, torch.bmm}),
        frozenset({"matmul", "__matmul__", "mm", "bmm"}),
        0,
        _match_right_2d,
    ),
    Pattern("dropout_addmm", frozenset({torch.addmm}), frozenset({"addmm"}), 1, _match_addmm),
    Pattern("dropout_conv2d", frozenset({torch.conv2d, F.conv2d}), frozenset(), 0, _match_conv2d),
)


def pattern_of(node):
    for pattern in PATTERNS:
        if (node.op == "call_function" and node.target in pattern.functions) or (
            node.op == "call_method" and node.target in pattern.methods
        ):
            return pattern
    return None


def is_view(node):
    return (node.op == "call_method" and node.target in VIEW_METHODS) or (
        node.op == "call_function" and node.target in VIEW_FUNCTIONS
    )


def is_scaling(node, value):
    """value * c, c * value or value / c for a Python number c (T5 scales its decoder's output
    by d_model**-0.5 before lm_head): a scale commutes with any mask."""
    scales = (node.op == "call_function" and node.target in SCALE_FUNCTIONS) or (
        node.op == "call_method" and node.target in SCALE_METHODS
    )
    if not scales or len(node.args) != 2 or node.kwargs:
        return False
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    left, right = node.args
    divides = node.target in (operator.truediv, torch.div, "div")
    return (left is value and number(right)) or (not divides and right is value and number(left))


def view_source(node):
    """The tensor a view or a scaling by a number reads (what _consumers follows, walked
    backwards), or None for any other node."""
    if is_view(node) and node.args and isinstance(node.args[0], Node):
        return node.args[0]
    return next((arg for arg in node.args[:2] if isinstance(arg, Node) and is_scaling(node, arg)), None)


def describe(node):
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def is_dropout(node):
    return node.op == "call_function" and node.target in DROPOUT_TARGETS
