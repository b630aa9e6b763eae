"""The two attention rows: `attention_dropout` (eager attention, softmax(scores) → dropout → @ v)
and `sdpa_dropout` (F.scaled_dot_product_attention with a constant dropout_p > 0, and
nn.MultiheadAttention's F.multi_head_attention_forward, which Dynamo keeps as one call and which
calls SDPA when need_weights=False). Both become ops/dropout_attention.py's fused op; this module
only matches.

Eager scores are q @ kᵀ followed by any chain of: scalings by a number, a symbolic number or a
0-d tensor, additive masks (`+`, `+=`), `masked_fill` / `torch.where` with a boolean mask and a
fill of -inf or at most -1e4, and dtype casts. Each op is affine in q @ kᵀ, so the chain is α · q kᵀ + β: α (the
scalings) goes to the op's scale (numbers) or into q (tensors), and β is the chain replayed on a
zero score (rewrite.py), the op's additive attn_mask. Where a fill replaces a score, the op adds
the score to the fill instead: the same probabilities, since exp(fill − max) underflows to zero,
except in a row whose every key is filled (eager attention then spreads it evenly over the
keys; the fused op over the keys' scaled scores)."""

import math
import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops.checks import SUPPORTED_DTYPES
from ..ops.dropout_attention import MAX_HEAD_DIM
from .patterns import SCALE_FUNCTIONS, SCALE_METHODS, arg_of, describe, hint, is_scaling, meta_value, shape_of

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
MHA_TARGETS = {F.multi_head_attention_forward}
SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax, torch.Tensor.softmax}
CAST_METHODS = {"to", "type", "type_as", "float", "half", "bfloat16"}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.bmm}
MATMUL_METHODS = {"matmul", "__matmul__", "bmm"}
ADD_FUNCTIONS, ADD_METHODS = {operator.add, operator.iadd, torch.add}, {"add"}
NOT_ATTENTION = "batched matmul that is not attention (softmax → dropout → @ v): left to Inductor"
# A fill at most this large empties its score's probability in any row with a key left.
MAX_FILL = -1e4


class AttentionMatch(NamedTuple):
    """What the fused op needs, as graph nodes: q (..., Lq, E); key_t, the right operand of
    q @ kᵀ (..., E, Lk) (k itself for SDPA: (..., Lk, E)); v (..., Lk, Ev); chain: the score ops
    between q @ kᵀ and the softmax, in order; scale: the numbers' product (None: SDPA's
    default); tensor_scales: (0-d tensor or symbolic number, divides) pairs; masked: whether
    the chain adds or fills; gemms: (M, K, N) of q kᵀ, then of P v, over all heads."""

    q: Node
    key_t: Node
    v: Node
    chain: tuple
    scale: float | None
    tensor_scales: tuple
    masked: bool
    gemms: tuple
    dtype: torch.dtype | None
    attn_mask: Node | None = None  # SDPA's own
    is_causal: bool = False
    enable_gqa: bool = False
    dead: tuple = ()  # eager: the nodes that computed P (casts, softmax, chain, q @ kᵀ), latest first


def is_sdpa(node):
    return node.op == "call_function" and node.target in SDPA_TARGETS | MHA_TARGETS


def _is_softmax(node):
    return (node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS) or (
        node.op == "call_method" and node.target == "softmax"
    )


def _is_cast(node):
    return node.op == "call_method" and node.target in CAST_METHODS


def _is_matmul(node):
    return (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in MATMUL_METHODS
    )


def _is_add(node):
    return (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ADD_METHODS
    )


def _constant(value):
    """A number, or a 0-d tensor built from one (torch.tensor(c), torch.full((), c)), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, Node) and value.op == "call_function" and value.target in (torch.tensor, torch.full):
        number = value.args[-1] if value.target is torch.full else value.args[0]
        return _constant(number) if not isinstance(number, Node) else None
    return None


def _scalar(value):
    """A 0-d tensor, or a symbolic number (1 / √E under dynamic shapes), as a graph node."""
    example = value.meta.get("example_value") if isinstance(value, Node) else None
    return isinstance(example, (torch.SymFloat, torch.SymInt)) or (
        isinstance(example, torch.Tensor) and example.dim() == 0
    )


def _score_step(node, value):
    """How node transforms the running score value (one of its arguments): "scale", "tensor
    scale", "mask", "fill" or "cast"; or the reason it cannot be folded into attention."""
    if is_scaling(node, value):
        return "scale"
    scales = (node.op == "call_function" and node.target in SCALE_FUNCTIONS) or (
        node.op == "call_method" and node.target in SCALE_METHODS
    )
    if scales and len(node.args) == 2 and not node.kwargs:
        other = node.args[1] if node.args[0] is value else node.args[0]
        divides = node.target in (operator.truediv, torch.div, "div")
        if _scalar(other) and (node.args[0] is value or not divides):
            return "tensor scale"
    if _is_add(node) and len(node.args) == 2 and not node.kwargs:
        return "mask"
    if _is_cast(node) and node.args[0] is value:
        return "cast"
    fills = ("masked_fill",) if node.op == "call_method" else (torch.masked_fill, torch.where)
    if node.target in fills and not node.kwargs and len(node.args) == 3:
        if node.target is torch.where:
            fill = node.args[2] if node.args[1] is value else node.args[1]
        else:
            fill = node.args[2] if node.args[0] is value else None
        number = _constant(fill)
        if number is None or not number <= MAX_FILL:
            return f"{describe(node)} of the scores with a fill that is not a constant <= {MAX_FILL:g}"
        return "fill"
    return f"{describe(node)} between q @ kᵀ and the softmax"


def _scores_chain(scores):
    """(q @ kᵀ node, the chain of (node, step) from it to scores) or the reason there is none.
    Depth first over an op's tensor arguments, as a mask may be added from either side."""
    if _is_matmul(scores):
        return scores, []
    reason = f"{describe(scores)} between q @ kᵀ and the softmax"
    for arg in (a for a in scores.args if isinstance(a, Node) and meta_value(a) is not None):
        step = _score_step(scores, arg)
        if step not in ("scale", "tensor scale", "mask", "fill", "cast"):
            reason = step
            continue
        found = _scores_chain(arg)
        if isinstance(found, str):
            reason = found
            continue
        qk, chain = found
        return qk, [*chain, (scores, arg, step)]
    return reason


def probabilities_source(dropout):
    """The nodes from the dropout's input back to the softmax whose output (through casts) alone
    reaches the dropout, or the reason there is none."""
    nodes, node = [], dropout.args[0]
    while isinstance(node, Node) and _is_cast(node):
        if len(node.users) > 1:
            return "the attention probabilities are read elsewhere (returned, or a head mask)"
        nodes.append(node)
        node = node.args[0]
    if not (isinstance(node, Node) and _is_softmax(node)):
        return NOT_ATTENTION
    if len(node.users) > 1:
        return "the attention probabilities are read elsewhere (returned, or a head mask)"
    dim = arg_of(node, 1, "dim")
    if dim not in (-1, len(shape_of(node)) - 1):
        return f"softmax over dim {dim}, not over the keys (the last dim)"
    return [*nodes, node]


def match_eager_attention(dropout, pv, operand):
    """The AttentionMatch of softmax(scores(q @ kᵀ)) → dropout → pv = (·) @ v, or the reason."""
    if operand is not dropout:
        return "a view or scaling between the attention probabilities' dropout and @ v"
    probabilities = probabilities_source(dropout)
    if isinstance(probabilities, str):
        return probabilities
    softmax = probabilities[-1]
    found = _scores_chain(softmax.args[0])
    if isinstance(found, str):
        return found
    qk, chain = found
    if any(len(node.users) > 1 for node, _, _ in chain) or len(qk.users) > 1:
        return "the attention scores are read elsewhere"
    q, key_t = qk.args[0], qk.args[1]
    v = pv.args[1] if len(pv.args) > 1 else None
    if not all(isinstance(t, Node) and meta_value(t) is not None for t in (q, key_t, v)):
        return "no shape information for q, k or v"
    dead = (*probabilities, *(node for node, _, _ in reversed(chain)), qk)
    return _checked(_eager_match(q, key_t, v, chain, pv)._replace(dead=dead), qk, softmax)


def _eager_match(q, key_t, v, chain, pv):
    scale, tensor_scales = 1.0, []
    for node, value, step in chain:
        if step == "scale":
            number = next(a for a in node.args if a is not value)
            scale = scale / number if node.target in (operator.truediv, torch.div, "div") else scale * number
        elif step == "tensor scale":
            other = node.args[1] if node.args[0] is value else node.args[0]
            tensor_scales.append((other, node.target in (operator.truediv, torch.div, "div")))
    masked = any(step in ("mask", "fill") for _, _, step in chain)
    out = meta_value(pv)
    return AttentionMatch(
        q, key_t, v, tuple(chain), scale, tuple(tensor_scales), masked, (), out.dtype if out is not None else None
    )


def _checked(match, qk, softmax):
    """match with its GEMM sizes, or why the shapes rule it out."""
    q, key_t, v = (meta_value(t) for t in (match.q, match.key_t, match.v))
    if not q.dim() == key_t.dim() == v.dim() or q.dim() not in (3, 4):
        return "attention operands must all be 3-D or all 4-D (no broadcast batch dims)"
    if not (_same(q.shape[:-2], key_t.shape[:-2]) and _same(v.shape[:-2], q.shape[:-2])):
        return "q, k and v have different batch or head dims (broadcast)"
    if not _same(meta_value(softmax).shape, meta_value(qk).shape):
        return "the attention mask broadcasts the scores to a larger shape"
    return match._replace(gemms=_gemms(q.shape, key_t.shape[-1], v.shape[-1]))


def _same(shape, other):
    """Equal sizes, symbolic ones included, decided without adding a guard."""
    return len(shape) == len(other) and all(statically_known_true(a == b) for a, b in zip(shape, other))


def _gemms(q_shape, lk, ev):
    """Sizes at their first-seen values (hint: reading them adds no guard)."""
    q_shape, lk, ev = [hint(s) for s in q_shape], hint(lk), hint(ev)
    rows = math.prod(q_shape[:-1])
    return ((rows, q_shape[-1], lk), (rows, lk, ev))


def match_sdpa(node):
    """(dropout_p, the AttentionMatch) of a scaled_dot_product_attention or a
    multi_head_attention_forward call, or (p, reason)."""
    if node.target in MHA_TARGETS:
        return _match_mha(node)
    q, k, v = (arg_of(node, i, name) for i, name in enumerate(("query", "key", "value")))
    p = arg_of(node, 4, "dropout_p", 0.0)
    attn_mask, is_causal = arg_of(node, 3, "attn_mask"), arg_of(node, 5, "is_causal", False)
    scale, enable_gqa = arg_of(node, 6, "scale"), arg_of(node, 7, "enable_gqa", False)
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        return None, "dropout_p is not a constant"
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return p, "is_causal or enable_gqa is not a constant"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        return p, "scale is not a constant"
    values = [meta_value(t) for t in (q, k, v)]
    if any(t is None for t in values) or (attn_mask is not None and meta_value(attn_mask) is None):
        return p, "no shape information for q, k, v or attn_mask"
    if not values[0].dim() == values[1].dim() == values[2].dim() or values[0].dim() not in (3, 4):
        return p, "attention operands must all be 3-D or all 4-D"
    out = meta_value(node)
    gemms = _gemms(values[0].shape, values[1].shape[-2], values[2].shape[-1])
    match = AttentionMatch(q, k, v, (), scale, (), attn_mask is not None, gemms, out.dtype if out is not None else None)
    return p, match._replace(attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)


def _match_mha(node):
    """F.multi_head_attention_forward(query (L, N, E), key (S, N, E), value, E, heads, ...): its
    SDPA call has heads × N planes of (L, S), head dim E / heads. The match's key_t is None:
    rewrite.py runs the function itself, with the fused op as its SDPA."""
    p, training = arg_of(node, 10, "dropout_p", 0.0), arg_of(node, 13, "training", True)
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        return None, "dropout_p is not a constant"
    if training is not True:
        return 0.0 if training is False else p, "training flag is not a constant"
    if arg_of(node, 15, "need_weights", True) is not False:
        return p, "the attention probabilities are read elsewhere: need_weights=True returns them"
    query, key = meta_value(arg_of(node, 0, "query")), meta_value(arg_of(node, 1, "key"))
    heads = arg_of(node, 4, "num_heads")
    if query is None or key is None or not isinstance(heads, int):
        return p, "no shape information for query or key"
    batch = hint(query.shape[1]) if query.dim() == 3 else 1
    head_dim = hint(query.shape[-1]) // heads
    rows, keys = batch * heads * hint(query.shape[0]), hint(key.shape[0])
    gemms = ((rows, head_dim, keys), (rows, keys, head_dim))
    out = meta_value(node) if not isinstance(node.meta.get("example_value"), tuple) else node.meta["example_value"][0]
    dtype = out.dtype if isinstance(out, torch.Tensor) else query.dtype
    return p, AttentionMatch(
        arg_of(node, 0, "query"), None, arg_of(node, 2, "value"), (), None, (), False, gemms, dtype
    )


def attention_reason(match):
    """Why the fused op cannot take a matched attention (dtype, device, head dims), or None."""
    q = meta_value(match.q)
    if match.dtype not in SUPPORTED_DTYPES or q.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {match.dtype if match.dtype not in SUPPORTED_DTYPES else q.dtype}"
    if q.device.type not in ("cuda", "cpu"):
        return f"unsupported device {q.device.type}"
    head_dims = (match.gemms[0][1], match.gemms[1][2])
    if max(head_dims) > MAX_HEAD_DIM:
        return f"head dims {head_dims} above {MAX_HEAD_DIM}"
    return None
