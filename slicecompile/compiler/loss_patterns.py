"""The hashed-outputs row, opt-in by options={"hashed_outputs": active}: F.cross_entropy (or
nn.CrossEntropyLoss) of a linear layer's logits, reached through views and casts that nothing else
reads, becomes slicecompile.hashed_linear_cross_entropy (ops/hashed_linear_cross_entropy.py): the
loss over about `active` of the output tiles, those the true labels and SimHash pick. It changes
the training objective (SLIDE's sampled softmax), hence opt-in; the op computes the full loss
whenever gradients are not recorded (evaluation under torch.no_grad()).

    logits = lm_head(h)                                  # F.linear, @ / matmul / addmm
    loss = F.cross_entropy(logits.view(-1, N).float(), target.view(-1))
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.fx import Node

from ..ops.hashed_linear_cross_entropy import DEFAULT_HASHED_BLOCK, REDUCTIONS
from ..ops.simhash import tile_budget
from .graphs import location, module_path
from .patterns import describe, is_view, meta_value, pattern_of, shape_of
from .records import Site
from .size_gate import size_reason

CASTS = {"float", "double", "half", "bfloat16", "to", "type_as"}


class LossMatch(NamedTuple):
    """What the op needs, as graph nodes (operand, weight (N, E) or (E, N) when
    weight_transposed, bias, target) and constants, plus the nodes it replaces (latest first)."""

    operand: Node
    weight: Node
    weight_transposed: bool
    bias: Node | None
    target: Node
    ignore_index: int
    reduction: str
    gemm: tuple  # the linear layer's (M, E, N)
    dtype: torch.dtype  # what the linear layer computes in
    dead: tuple


def is_cross_entropy(node):
    return node.op == "call_function" and node.target is F.cross_entropy


def match_loss(node):
    """The LossMatch of cross_entropy(linear(x) [→ views, casts], target), or the reason to skip."""
    args = dict(zip(("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction"), node.args))
    args |= node.kwargs
    if args.get("weight") is not None:
        return "class weights (weight=...)"
    if args.get("label_smoothing", 0.0) != 0.0:
        return "label smoothing"
    if args.get("size_average") is not None or args.get("reduce") is not None:
        return "size_average / reduce (deprecated arguments)"
    reduction, ignore_index = args.get("reduction", "mean"), args.get("ignore_index", -100)
    if reduction not in REDUCTIONS or isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        return "reduction or ignore_index is not a constant"
    logits, reader, dead = args.get("input"), node, []
    if not isinstance(logits, Node) or len(shape_of(logits)) != 2:
        return "the loss's input is not (rows, classes) logits"
    while True:
        if others := [describe(user) for user in logits.users if user is not reader]:
            return f"the logits are read elsewhere too: {', '.join(others)}"
        if not (is_view(logits) or _is_cast(logits)) or not isinstance(logits.args[0], Node):
            break
        dead.append(logits)
        logits, reader = logits.args[0], logits
    pattern = pattern_of(logits)
    if pattern is None or pattern.name == "dropout_conv2d":
        return f"the logits are not a linear layer's output ({describe(logits)})"
    x = logits.args[pattern.operand_index] if len(logits.args) > pattern.operand_index else None
    match = pattern.match(logits, x) if isinstance(x, Node) else "no input operand"
    if isinstance(match, str) or match.batched:
        return match if isinstance(match, str) else "batched matmul before the loss"
    out = meta_value(logits)
    dtype = out.dtype if out is not None else meta_value(x).dtype
    target = args.get("target")
    return LossMatch(x, match.weight, match.weight_transposed, match.bias, target, ignore_index, reduction,
                     match.gemm, dtype, (*dead, logits))  # fmt: skip


def _is_cast(node):
    """x.float(), x.to(dtype) and the like: a cast between the logits and the loss."""
    if node.op != "call_method" or node.target not in CASTS or not node.args:
        return False
    return node.target != "to" or all(isinstance(arg, torch.dtype) for arg in (*node.args[1:], *node.kwargs.values()))


def decide_loss(node, options):
    """The Site of a cross_entropy call under options.hashed_outputs (its active share); gemms is
    the linear layer's (M, E, N)."""
    value = meta_value(node.args[0]) if node.args else None
    site = Site(
        name=node.name,
        module=module_path(node),
        location=location(node),
        p=options.hashed_outputs,
        consumer="cross_entropy",
        pattern="hashed_outputs",
        input_shape=shape_of(node.args[0]) if node.args else (),
        dtype=str(value.dtype).replace("torch.", "") if value is not None else "?",
        device=value.device.type if value is not None else "?",
        side="loss",
        policy="hashed",
        node=node,
    )
    match = match_loss(node)
    if isinstance(match, str):
        site.reason = match
    else:
        site.gemms = (match.gemm,)
        site.consumer = describe(match.dead[-1])
        site.reason = _reason(match, options)
        site.matches = [(node, match)]
    site.rewritten = not site.reason
    site.reason = site.reason or "rewritten"
    return site


def _reason(match, options):
    if reason := size_reason([match.gemm], options, match.dtype):
        return reason
    n, block_n = match.gemm[2], DEFAULT_HASHED_BLOCK[1]
    tiles, budget = -(-n // block_n), tile_budget(n, block_n, options.hashed_outputs)
    if 2 * budget > tiles:
        return f"too few output tiles to pay: {budget} of {tiles} tiles of {block_n} classes would be active"
    if meta_value(match.target) is None or meta_value(match.target).dtype != torch.int64:
        return "target is not int64 class indices"
    return None
