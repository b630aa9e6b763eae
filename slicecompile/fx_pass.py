"""Find dropout → matmul (and dropout → conv2d) sites in a Dynamo FX graph and decide which ones to rewrite.

Detection only, no mutation: `find_sites` returns one `Site` per dropout node, rewritten or
skipped with a reason, so `explain()` and the backend share one set of decisions. A site is
a dropout (training, constant 0 < p < 1) whose users all reach the *input* operand of a
matmul against a 2-D weight, possibly through views and scalings by a number. The matmul kinds
are the named rows of PATTERNS; rewrite.py turns a matched site into the block-dropout op. A
conv2d takes the dropout directly (no view between), as channel-structured dropout
(dropout_conv). Sites inside activation checkpointing's subgraphs count too.
"""

import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.fx import Node

from .checks import SUPPORTED_DTYPES

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


# Scalings by a Python number, followed like views (_is_scaling).
SCALE_FUNCTIONS = {operator.mul, torch.mul, operator.truediv, torch.div}
SCALE_METHODS = {"mul", "div"}


@dataclass
class Site:
    """One dropout in the graph and what the pass decided about it."""

    name: str  # the dropout node
    module: str  # module path of the dropout, "" for a functional call in the top-level forward
    location: str  # file:line of the dropout call
    p: float | None
    consumer: str  # the matmul kind(s), or what else used the dropout
    pattern: str | None  # the PATTERNS row that matched, if any
    input_shape: tuple  # the dropout input's shape (dynamic sizes at their first-seen value)
    dtype: str
    device: str
    gemms: tuple = ()  # (M, K, N) per consuming matmul
    rewritten: bool = False
    reason: str = ""
    policy: str = "block"  # how the rewrite drops: "block" tiles or one "slice" window
    node: Node | None = field(default=None, repr=False)  # the dropout node, for rewrite.py
    matches: list = field(default_factory=list, repr=False)  # (consumer node, Match), for rewrite.py

    @property
    def dense_flops(self):
        """Forward + both backward GEMMs, dense."""
        return sum(6 * m * k * n for m, k, n in self.gemms)

    @property
    def saved_flops(self):
        """Expected FLOPs skipped: a fraction p of each of the three GEMMs."""
        return round(self.p * self.dense_flops) if self.rewritten else 0


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


def _meta(node):
    value = node.meta.get("example_value") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _hint(size):
    """A concrete size, without adding a guard: a dynamic size counts at its first-seen value."""
    if isinstance(size, torch.SymInt):
        return size.node.hint if size.node.hint is not None else 0
    return int(size)


def _shape(node):
    value = _meta(node)
    return tuple(_hint(s) for s in value.shape) if value is not None else ()


def _arg(node, index, name, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _gemm(operand, right_shape_kn):
    shape = _shape(operand)
    k, n = right_shape_kn
    m = 1
    for size in shape[:-1]:
        m *= size
    return (m, k, n)


def _match_linear(node, operand):
    weight, bias = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if len(_shape(weight)) != 2:
        return "no shape information for the weight"
    n, k = _shape(weight)
    return Match(operand, weight, False, bias, _gemm(operand, (k, n)))


def _match_right_2d(node, operand, right_index=1):
    right = _arg(node, right_index, "mat2", _arg(node, right_index, "other"))
    if len(_shape(operand)) < 2 or len(_shape(right)) < 2:
        return "matrix-vector product (a 1-D operand)"
    if len(_shape(right)) != 2:
        return _match_batched(operand, right)
    return Match(operand, right, True, None, _gemm(operand, _shape(right)))


def _match_addmm(node, operand):
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return "addmm with beta or alpha other than 1"
    match = _match_right_2d(node, operand, right_index=2)
    return match if isinstance(match, str) else match._replace(bias=node.args[0])


def _match_batched(operand, right):
    left_shape, right_shape = _shape(operand), _shape(right)
    if len(left_shape) < 3 or len(right_shape) < 3:
        return "batched matmul against a 2-D operand"
    if left_shape[:-2] != right_shape[:-2]:
        return "batched matmul with broadcast batch dims"
    return Match(operand, right, False, None, _gemm(operand, right_shape[-2:]), batched=True)


def _match_bmm(node, operand):
    return _match_batched(operand, _arg(node, 1, "mat2"))


def _match_conv2d(node, operand):
    weight, bias = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    conv = tuple(
        _arg(node, i, name, default) for i, name, default in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1))
    )
    if _arg(node, 6, "groups", 1) != 1:
        return "grouped convolution (groups != 1)"
    if not is_dropout(operand):
        return "conv2d input reached through a view or scaling of the dropout"
    if any(isinstance(arg, Node) for arg in conv):
        return "conv2d stride, padding or dilation is not a constant"
    if len(_shape(operand)) != 4 or len(_shape(weight)) != 4 or len(_shape(node)) != 4:
        return "conv2d input is not batched (N, C, H, W)"
    out_channels, in_channels, kernel_h, kernel_w = _shape(weight)
    batch, _, out_h, out_w = _shape(node)
    gemm = (batch * out_h * out_w, in_channels * kernel_h * kernel_w, out_channels)
    return Match(operand, weight, False, bias, gemm, conv=conv)


PATTERNS = (
    Pattern("dropout_linear", frozenset({F.linear, torch._C._nn.linear}), frozenset(), 0, _match_linear),
    Pattern(
        "dropout_matmul",
        frozenset({torch.matmul, operator.matmul, torch.Tensor.matmul, torch.mm, torch.Tensor.mm}),
        frozenset({"matmul", "__matmul__", "mm"}),
        0,
        _match_right_2d,
    ),
    Pattern("dropout_addmm", frozenset({torch.addmm}), frozenset({"addmm"}), 1, _match_addmm),
    Pattern("dropout_bmm", frozenset({torch.bmm, torch.Tensor.bmm}), frozenset({"bmm"}), 0, _match_bmm),
    Pattern("dropout_conv2d", frozenset({torch.conv2d, F.conv2d}), frozenset(), 0, _match_conv2d),
)


def _pattern_of(node):
    for pattern in PATTERNS:
        if (node.op == "call_function" and node.target in pattern.functions) or (
            node.op == "call_method" and node.target in pattern.methods
        ):
            return pattern
    return None


def _is_view(node):
    return (node.op == "call_method" and node.target in VIEW_METHODS) or (
        node.op == "call_function" and node.target in VIEW_FUNCTIONS
    )


def _is_scaling(node, value):
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


def _describe(node):
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def is_dropout(node):
    return node.op == "call_function" and node.target in DROPOUT_TARGETS


def _consumers(dropout):
    """(matmul node, pattern, operand) for every use, following views, and, if some use is not
    a matmul input, (what uses it, why that rules the site out)."""
    found, frontier = [], [dropout]
    while frontier:
        value = frontier.pop()
        for user in value.users:
            if (_is_view(user) and user.args and user.args[0] is value) or _is_scaling(user, value):
                frontier.append(user)
                continue
            pattern, name = _pattern_of(user), _describe(user)
            if pattern is None:
                return found, (name, f"used by {name} (not a matmul input)")
            operands = [i for i, arg in enumerate(user.args) if arg is value] + [
                key for key, arg in user.kwargs.items() if arg is value
            ]
            if operands != [pattern.operand_index]:
                return found, (name, f"used by {name} as another operand than its input")
            found.append((user, pattern, value))
    return found, None


def _flag_reason(dropout, options):
    """Why a dropout's own arguments rule it out, or None."""
    p = _arg(dropout, 1, "p", 0.5)
    training = _arg(dropout, 2, "training" if dropout.target is not torch.dropout else "train", True)
    if training is not True:
        return "eval mode (training=False)" if training is False else "training flag is not a constant"
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        return "p is not a constant"
    if p == 0:
        return "p = 0 (dropout is the identity)"
    if not 0 < p < 1:
        return f"p = {p} is outside (0, 1)"
    if not options.enabled:
        return "disabled by options"
    if _arg(dropout, 3, "inplace", False) is True:
        source = dropout.args[0]
        if source.op == "placeholder" or len(source.users) > 1:
            return "in-place dropout whose input is read elsewhere"
    return None


def _operand_reason(dropout, matches, options):
    """Why the matched matmuls rule the site out (dtype, device, autocast, size), or None."""
    if len({m.operand for _, m in matches}) > 1:
        return "feeds matmuls through different views"
    if len({m.batched for _, m in matches}) > 1:
        return "feeds both batched and plain matmuls"
    if any(m.conv for _, m in matches) and len(matches) > 1:
        return "feeds a convolution and other layers"
    x = _meta(dropout.args[0])
    if x is None:
        return "no shape information"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {x.dtype}"
    if x.device.type not in ("cuda", "cpu"):
        return f"unsupported device {x.device.type}"
    for _, match in matches:
        # Under autocast the matmul computes in its output's dtype; the rewrite casts the
        # operands to it, as autocast would.
        if match.dtype not in SUPPORTED_DTYPES:
            return f"unsupported matmul dtype {match.dtype}"
        if any(t is not None and t.dtype not in SUPPORTED_DTYPES for t in (_meta(match.weight), _meta(match.bias))):
            return "unsupported weight or bias dtype"
        if isinstance(match.bias, Node) and _meta(match.bias) is not None and _shape(match.bias) != match.gemm[2:]:
            return "bias is not a vector of out_features"
    size = sum(m * k * n for m, k, n in (match.gemm for _, match in matches))
    if size < options.min_gemm_size:
        return f"GEMM too small (M*K*N = {size} < min_gemm_size = {options.min_gemm_size})"
    return None


def _policy(site, options):
    """The site's policy: options.policy, except that batched matmuls always take block tiles
    (a slice window is defined for linear layers)."""
    batched = any(match.batched for _, match in site.matches)
    return "block" if batched else options.policy


def _policy_reason(site):
    conv = any(match.conv for _, match in site.matches)
    features = _meta(site.node.args[0]).shape[1 if conv else -1]
    if site.policy == "slice" and isinstance(features, torch.SymInt):
        return "slice policy needs a static number of input features"
    return None


def _site(dropout):
    x = _meta(dropout.args[0])
    p = _arg(dropout, 1, "p", 0.5)
    return Site(
        name=dropout.name,
        module=_module_path(dropout),
        location=_location(dropout),
        p=float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else None,
        consumer="",
        pattern=None,
        input_shape=_shape(dropout.args[0]),
        dtype=str(x.dtype).replace("torch.", "") if x is not None else "?",
        device=x.device.type if x is not None else "?",
        node=dropout,
    )


def decide(dropout, options):
    """The Site record for one dropout node: rewritten=True means rewrite.py may apply it."""
    site = _site(dropout)
    consumers, blocker = _consumers(dropout)
    site.consumer = blocker[0] if blocker else "+".join(_describe(node) for node, _, _ in consumers)
    site.reason = _flag_reason(dropout, options) or (blocker[1] if blocker else None)
    if not consumers and not site.reason:
        site.reason = "result unused"
    for node, pattern, operand in consumers:
        site.pattern = site.pattern or pattern.name
        match = pattern.match(node, operand)
        if isinstance(match, str):
            site.pattern, site.reason = pattern.name, site.reason or match
            break
        out = _meta(node)
        site.matches.append((node, match._replace(dtype=None if out is None else out.dtype)))
        site.pattern = "dropout_bmm" if match.batched else site.pattern
    site.gemms = tuple(match.gemm for _, match in site.matches)
    site.policy = _policy(site, options)
    site.reason = site.reason or _operand_reason(dropout, site.matches, options) or _policy_reason(site)
    site.rewritten = not site.reason
    site.reason = site.reason or "rewritten"
    return site


CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint


def graph_modules(gm, reason=None, seen=None):
    """gm and the subgraphs of its higher-order ops, recursively, each with the reason its
    dropouts are left alone (None where they may be rewritten). Activation checkpointing's
    bodies may: when AOTAutograd recomputes a random op (our mask and window draws are), it
    replays the generator state the forward drew with, so backward sees the forward's mask."""
    seen = set() if seen is None else seen
    if id(gm) in seen:
        return
    seen.add(id(gm))
    yield gm, reason
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        for arg in node.args:
            sub = getattr(gm, arg.target, None) if isinstance(arg, Node) and arg.op == "get_attr" else None
            if isinstance(sub, torch.fx.GraphModule):
                inner = f"inside the subgraph {arg.target} of {node.target.name()}"
                yield from graph_modules(sub, reason or (None if node.target is CHECKPOINT else inner), seen)


def find_sites(gm, options):
    """Every dropout in gm and in its higher-order ops' subgraphs, each with the pass's decision
    (no mutation). Those inside activation checkpointing are decided like any other; those inside
    other higher-order ops (control flow, ...) are listed as skipped."""
    sites = []
    for sub, reason in graph_modules(gm):
        for node in filter(is_dropout, sub.graph.nodes):
            site = decide(node, options)
            if reason:
                site.rewritten, site.matches, site.reason = False, [], f"{reason}: not supported"
            sites.append(site)
    return sites


def _module_path(node):
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]  # e.g. "L['self'].layers[0].dropout"
    path = re.sub(r"^[LG]\['[^']*'\]", "", path)  # the frame's local or global the module came from
    return re.sub(r"\['?([^'\]]*)'?\]", r".\1", path).replace("_modules.", "").strip(".")


TORCH_DIR = os.path.dirname(torch.__file__)


def _location(node):
    """file:line of the innermost user frame that made the node (torch's own frames, such as
    a default-device context's, are skipped)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    user = [(path, line) for path, line in frames if not path.startswith(TORCH_DIR)]
    if not user:
        return ""
    path, line = user[-1]
    return f"{os.path.basename(path)}:{line}"
