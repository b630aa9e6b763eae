"""Find dropout → matmul (and dropout → conv2d) sites in a Dynamo FX graph and decide which ones to rewrite.

Detection only, no mutation: `find_sites` returns one `Site` per dropout node, rewritten or
skipped with a reason, so `explain()` and the backend share one set of decisions. A site is
a dropout (training, constant 0 < p < 1) whose users all reach the *input* operand of a
matmul against a 2-D weight, possibly through views and scalings by a number. The matmul kinds
are the named rows of patterns.PATTERNS; rewrite.py turns a matched site into the block-dropout
op. A conv2d takes the dropout directly (no view between), as channel-structured dropout
(ops/dropout_conv2d.py). Attention (attention_patterns.py) has two kinds of site: a dropout of
softmax probabilities before @ v, and a scaled_dot_product_attention (or multi-head attention)
call with dropout, whose node is the site. Sites inside activation checkpointing's subgraphs
count too.
"""

import torch
from torch.fx import Node

from ..ops.checks import SUPPORTED_DTYPES
from .attention_patterns import (
    NOT_ATTENTION,
    attention_reason,
    is_sdpa,
    match_eager_attention,
    match_sdpa,
    probabilities_source,
)
from .graphs import graph_modules, location, module_path
from .loss_patterns import decide_loss, is_cross_entropy
from .patterns import (
    arg_of,
    describe,
    dropout_p,
    is_dropout,
    is_scaling,
    is_view,
    meta_value,
    pattern_of,
    shape_of,
    static_size,
    view_source,
)
from .records import DISABLED, EVAL_MODE, IDENTITY, INPUT_SIDE_OFF, OUTPUT_SIDE_OFF, Site
from .size_gate import size_reason
from .verdicts import judge


def _consumers(dropout):
    """(matmul node, pattern, operand) for every use, following views, and, if some use is not
    a matmul input, (what uses it, why that rules the site out)."""
    found, frontier = [], [dropout]
    while frontier:
        value = frontier.pop()
        for user in value.users:
            if (is_view(user) and user.args and user.args[0] is value) or is_scaling(user, value):
                frontier.append(user)
                continue
            pattern, name = pattern_of(user), describe(user)
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
    p = dropout_p(dropout)
    training = arg_of(dropout, 2, "training" if dropout.target is not torch.dropout else "train", True)
    if training is not True:
        return EVAL_MODE if training is False else "training flag is not a constant"
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        return "p is not a constant"
    if p == 0:
        return IDENTITY
    if not 0 < p < 1:
        return f"p = {p} is outside (0, 1)"
    if not options.enabled:
        return DISABLED
    if arg_of(dropout, 3, "inplace", False) is True:
        source = dropout.args[0]
        if source.op == "placeholder" or len(source.users) > 1:
            return "in-place dropout whose input is read elsewhere"
    return None


def _operand_reason(operand, matches, options):
    """Why the matched matmuls, whose (dropped or not) input is operand, rule the site out
    (dtype, device, autocast, size), or None."""
    if len({m.operand for _, m in matches}) > 1:
        return "feeds matmuls through different views"
    if len({m.batched for _, m in matches}) > 1:
        return "feeds both batched and plain matmuls"
    if any(m.conv for _, m in matches) and len(matches) > 1:
        return "feeds a convolution and other layers"
    x = meta_value(operand)
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
        if any(
            t is not None and t.dtype not in SUPPORTED_DTYPES
            for t in (meta_value(match.weight), meta_value(match.bias))
        ):
            return "unsupported weight or bias dtype"
        if (
            isinstance(match.bias, Node)
            and meta_value(match.bias) is not None
            and shape_of(match.bias) != match.gemm[2:]
        ):
            return "bias is not a vector of out_features"
    dtype = next((match.dtype for _, match in matches if match.dtype is not None), x.dtype)
    return size_reason([match.gemm for _, match in matches], options, dtype)


def _policy(site, options):
    """The site's policy: options.policy, except that batched matmuls always take block tiles
    (a slice window is defined for linear layers)."""
    batched = any(match.batched for _, match in site.matches)
    return "block" if batched else options.policy


def _attention_policy(options):
    """An attention site's policy: "block" dropout of its probabilities, or "dropkey"."""
    return "dropkey" if options.attention == "dropkey" else "block"


def _policy_reason(site):
    conv = any(match.conv for _, match in site.matches)
    features = meta_value(site.node.args[0]).shape[1 if conv else -1]
    if site.policy == "slice" and static_size(features) is None:
        return "slice policy needs a static number of input features"
    return None


def _site(dropout):
    x = meta_value(dropout.args[0])
    p = dropout_p(dropout)
    return Site(
        name=dropout.name,
        module=module_path(dropout),
        location=location(dropout),
        p=float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else None,
        consumer="",
        pattern=None,
        input_shape=shape_of(dropout.args[0]),
        dtype=str(x.dtype).replace("torch.", "") if x is not None else "?",
        device=x.device.type if x is not None else "?",
        node=dropout,
    )


def _finish(site, operand, options):
    site.gemms = tuple(match.gemm for _, match in site.matches)
    site.reason = site.reason or _operand_reason(operand, site.matches, options) or _policy_reason(site)
    site.rewritten = not site.reason
    site.reason = site.reason or "rewritten"
    return site


def _input_side(dropout, options):
    """The Site of dropout → matmul(s), and whether every use of the dropout is a matmul input."""
    site = _site(dropout)
    consumers, blocker = _consumers(dropout)
    site.consumer = blocker[0] if blocker else "+".join(describe(node) for node, _, _ in consumers)
    flag_reason = _flag_reason(dropout, options)
    site.reason = flag_reason or (blocker[1] if blocker else None)
    if not consumers and not site.reason:
        site.reason = "result unused"
    if blocker and not isinstance(probabilities_source(dropout), str):
        site.side, site.pattern = "attention", "attention_dropout"
        site.reason = flag_reason or f"the attention probabilities are read elsewhere: {blocker[1]}"
        return _finish(site, None, options), True
    if not site.reason and not options.input_side:
        site.reason = INPUT_SIDE_OFF
    for node, pattern, operand in consumers:
        site.pattern = site.pattern or pattern.name
        match = pattern.match(node, operand)
        if isinstance(match, str):
            site.pattern, site.reason = pattern.name, site.reason or match
            break
        out = meta_value(node)
        site.matches.append((node, match._replace(dtype=None if out is None else out.dtype)))
    if any(match.batched for _, match in site.matches):
        return _attention(site, dropout, options), True
    site.policy = _policy(site, options)
    return _finish(site, dropout.args[0], options), bool(consumers) and blocker is None


def _attention(site, dropout, options):
    """An input site whose matmul is batched: eager attention (softmax → dropout → @ v) becomes
    the fused attention op; any other batched matmul stays as it is (no kernel skips its tiles)."""
    site.side, site.policy = "attention", _attention_policy(options)
    if len(site.matches) > 1:
        match = "the attention probabilities feed several matmuls"
    else:
        ((pv, batched),) = site.matches
        match = match_eager_attention(dropout, pv, batched.operand)
    if match == NOT_ATTENTION:
        site.matches, site.reason = [], site.reason or match
        return _finish(site, None, options)
    site.pattern = "attention_dropout"
    return _finish_attention(site, match, options)


def _finish_attention(site, match, options):
    if isinstance(match, str):
        site.matches, site.reason = [], site.reason or match
    else:
        site.matches, site.gemms = [(site.matches[0][0] if site.matches else site.node, match)], match.gemms
        site.reason = site.reason or attention_reason(match) or size_reason(match.gemms, options, match.dtype)
    site.rewritten = not site.reason
    site.reason = site.reason or "rewritten"
    return site


def decide_sdpa(node, options):
    """The Site of a scaled_dot_product_attention call: rewritten when its dropout_p is a
    constant in (0, 1) (modules pass 0 in eval mode)."""
    site = _site(node)
    site.p, site.consumer, site.pattern, site.side = None, describe(node), "sdpa_dropout", "attention"
    site.policy = _attention_policy(options)
    p, match = match_sdpa(node)
    if p is not None:
        site.p = float(p)
        site.reason = IDENTITY if p == 0 else (None if 0 < p < 1 else f"dropout_p = {p} is outside (0, 1)")
    if not site.reason and not options.enabled:
        site.reason = DISABLED
    if not site.reason and not options.input_side:
        site.reason = INPUT_SIDE_OFF
    return _finish_attention(site, match, options)


def _producer(dropout):
    """The node whose output alone reaches the dropout, through views and scalings by a number
    that nothing else reads, or (the node that is read elsewhere, why)."""
    node = dropout.args[0]
    while isinstance(node, Node):
        if len(node.users) > 1:
            return node, f"the {describe(node)} before the dropout is read elsewhere too"
        source = view_source(node)
        if source is None:
            return node, None
        node = source
    return None, "no input node"


def _output_side(dropout, options):
    """The Site of matmul → dropout (block tiles of the matmul's output), or None when neither a
    matmul nor one op applied to a matmul's output made the dropout's input."""
    site = _site(dropout)
    site.side, site.policy = "output", "block"
    producer, site.reason = _producer(dropout)
    pattern = pattern_of(producer) if producer is not None else None
    if pattern is None:
        made_by = producer.args[0] if site.reason is None and producer.args else None
        if not (isinstance(made_by, Node) and pattern_of(made_by)):
            return None
        site.consumer = describe(made_by)
        site.reason = _flag_reason(dropout, options) or (
            f"{describe(producer)} between {describe(made_by)} and the dropout (not fused)"
        )
        return _finish(site, None, options)
    site.consumer, site.pattern = describe(producer), pattern.name.replace("dropout_", "") + "_dropout"
    x = producer.args[pattern.operand_index] if len(producer.args) > pattern.operand_index else None
    if pattern.name == "dropout_conv2d":
        match = "conv2d before the dropout (the output side covers linear layers)"
    else:
        match = pattern.match(producer, x) if isinstance(x, Node) else "no input operand"
    if not isinstance(match, str) and match.batched:
        match = "batched matmul before the dropout (the output side covers linear layers)"
    if isinstance(match, str):
        site.reason = _flag_reason(dropout, options) or site.reason or match
        return _finish(site, None, options)
    out = meta_value(producer)
    site.matches = [(producer, match._replace(dtype=None if out is None else out.dtype))]
    site.reason = _flag_reason(dropout, options) or site.reason
    if not site.reason and not options.output_side:
        site.reason = OUTPUT_SIDE_OFF
    return _finish(site, x, options)


def decide(dropout, options):
    """The Site record for one dropout node: rewritten=True means rewrite.py may apply it. The
    input side (dropout → matmul) is tried first; the output side (matmul → dropout) when that
    fails. A site that fits both (linear → dropout → linear) is an input-side site."""
    inputs, feeds_matmuls = _input_side(dropout, options)
    if inputs.rewritten:
        return inputs
    outputs = _output_side(dropout, options)
    if outputs is not None and (outputs.rewritten or not feeds_matmuls):
        return outputs
    return inputs


def find_sites(gm, options):
    """Every dropout in gm and in its higher-order ops' subgraphs, each with the pass's decision
    (no mutation). Those inside activation checkpointing are decided like any other; those inside
    other higher-order ops (control flow, ...) are listed as skipped."""
    sites = []
    for sub, reason in graph_modules(gm):
        for node in sub.graph.nodes:
            if is_sdpa(node):
                site = decide_sdpa(node, options)
            elif is_dropout(node):
                site = decide(node, options)
            elif options.hashed_outputs and is_cross_entropy(node):
                site = decide_loss(node, options)
            else:
                continue
            if reason:
                site.rewritten, site.matches, site.reason = False, [], f"{reason}: not supported"
            sites.append(site)
    return _one_side_per_matmul(judge(sites, options))


def _one_side_per_matmul(sites):
    """A matmul with a rewritten site on each side (linear → ReLU → dropout → linear → dropout)
    keeps its input side: the ops drop one side of a matmul. So does a linear layer whose loss
    would be computed over hashed outputs (the hashed loss takes the layer's input undropped)."""
    fed = {node: site for site in sites if site.rewritten and site.side == "input" for node, _ in site.matches}
    for site in (site for site in sites if site.rewritten and site.side in ("output", "loss")):
        matmul = site.matches[0][1].dead[-1] if site.side == "loss" else site.matches[0][0]
        if matmul in fed:
            by = fed[matmul]
            where = " ".join(part for part in (by.module, f"({by.location})" if by.location else "") if part)
            site.rewritten, site.matches = False, []
            site.gemms = site.gemms if site.side == "loss" else ()
            site.reason = (
                f"the {site.consumer}'s input is block-dropped already by {where or by.name}: one side per matmul"
            )
    return sites
