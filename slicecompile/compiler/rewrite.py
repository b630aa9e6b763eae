"""Rewrite the sites sites.py decided on: each dropout → matmul becomes one mask draw and one
block-dropout op per matmul (ops/input_dropout_linear.py), or, under the slice policy, one
window draw and one slice-dropout op per linear layer; a dropout → conv2d becomes
channel-structured dropout (ops/dropout_conv2d.py) under either policy; a matmul → dropout
(output side) becomes block dropout of the linear layer's output (ops/output_dropout_linear.py),
under either policy; eager attention's softmax → dropout → @ v, and an SDPA call with
dropout, become the fused block-dropout attention (ops/dropout_attention.py), under the site's
policy (options={"attention": "dropkey"}: keys dropped before the softmax).

The replacements are plain Python functions called from the graph; compile_fx retraces the
graph with make_fx, which traces them into their torch ops (rand, argsort, the custom op),
so the mask is drawn inside the compiled graph from torch's generator, with no host sync.
"""

import contextlib
import logging
import operator

import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode
from torch.fx import Node

from ..ops import (
    BlockMask,
    SliceWindow,
    draw_block_mask,
    dropout_attention,
    dropout_linear_with_mask,
    linear_dropout_with_mask,
    slice_dropout_linear_with_window,
)
from ..ops.dropout_conv2d import dropout_conv2d
from ..ops.hashed_linear_cross_entropy import hashed_linear_cross_entropy
from ..ops.masks import flattened_rows
from .patterns import meta_value

log = logging.getLogger("slicecompile")


def draw_site_mask(x, p, block):
    """One mask over x flattened to (M, K); every matmul of the site shares it, as they would
    share an element-wise dropout's mask."""
    in_features = x.shape[-1]
    mask = draw_block_mask(flattened_rows(x), in_features, p, block, device=x.device)
    return mask.kept, mask.count


def linear_under_mask(x, weight, bias, kept, count, p, block, dtype):
    """F.linear(x, weight, bias) in dtype, with x block-dropped by the mask (kept, count)."""
    in_features = x.shape[-1]
    mask = BlockMask(kept, count, (flattened_rows(x), in_features), tuple(block), p)
    bias = None if bias is None else bias.to(dtype)
    return dropout_linear_with_mask(x.to(dtype), weight.to(dtype), bias, mask)


def draw_site_window(x, p):
    """One slice window over x's last dimension, shared by every matmul of the site."""
    return torch.ops.slicecompile.draw_slice_window(x.shape[-1], float(p), device=torch.device("cpu"))


def linear_under_window(x, weight, bias, window, p, dtype):
    """F.linear(x, weight, bias) in dtype, with x slice-dropped by the window."""
    bias = None if bias is None else bias.to(dtype)
    return slice_dropout_linear_with_window(x.to(dtype), weight.to(dtype), bias, SliceWindow(window, x.shape[-1], p))


def conv2d_under_channel_mask(x, weight, bias, conv, p, policy, samples_per_group, dtype):
    """F.conv2d(x, weight, bias, *conv) in dtype, with x's channels dropped under policy; the
    convolution is the site's only consumer, so the mask is drawn inside."""
    bias = None if bias is None else bias.to(dtype)
    x, weight = x.to(dtype), weight.to(dtype)
    return dropout_conv2d(x, weight, bias, *conv, p=p, policy=policy, samples_per_group=samples_per_group)


def attention_under_block_dropout(
    q, k, v, attn_mask, p, is_causal, scale, enable_gqa, block, dtype, eager, policy="dropout"
):
    """dropout_attention in dtype with SDPA's arguments under policy ("dropout" or "dropkey");
    for eager attention (eager: its (0-d tensor or symbolic number, divides) scalings), k is
    given as kᵀ and q is scaled first."""
    if eager is not None:
        for factor, divides in eager:
            q = q / factor if divides else q * factor
        k = k.transpose(-2, -1)
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, dtype):
        attn_mask = attn_mask.float()
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return dropout_attention(q, k, v, attn_mask, p, is_causal, scale, enable_gqa, block, policy=policy)


def hashed_loss(x, weight, bias, target, active, ignore_index, reduction, dtype, out_dtype):
    """F.cross_entropy(F.linear(x, weight, bias) viewed as (rows, classes), target) over hashed
    output tiles, with the linear layer in dtype and the loss in out_dtype and target's shape, as
    the original returned it."""
    bias = None if bias is None else bias.to(dtype)
    rows = target.reshape(x.shape[:-1])
    loss = hashed_linear_cross_entropy(
        x.to(dtype), weight.to(dtype), rows, bias, active=active, ignore_index=ignore_index, reduction=reduction
    )
    return loss.to(out_dtype).reshape(target.shape if reduction == "none" else ())


@contextlib.contextmanager
def _sdpa_as_block_dropout(block, policy):
    """F.scaled_dot_product_attention, as torch.nn.functional's own functions call it, replaced by
    the fused op under policy: the body of F.multi_head_attention_forward then runs on it."""
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return dropout_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, block, policy=policy)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def multi_head_attention_under_block_dropout(*args, block, policy="dropout", **kwargs):
    """F.multi_head_attention_forward(*args, **kwargs) (need_weights=False) with block dropout
    under policy."""
    with _sdpa_as_block_dropout(block, policy):
        return F.multi_head_attention_forward(*args, **kwargs)


def _example_value(node, fn, *args):
    """Dynamo's fake-tensor metadata for a new node, so later passes can read shapes;
    computed from the inputs' fake tensors (their ops run in the fake mode)."""
    values = [a.meta.get("example_value") if hasattr(a, "meta") else a for a in args]
    try:
        with detect_fake_mode(values) or contextlib.nullcontext():  # factories (rand) must be fake too
            node.meta["example_value"] = fn(*values)
    except Exception:  # metadata only: the pass stays correct without it
        node.meta.pop("example_value", None)


def linear_then_block_dropout(x, weight, bias, p, block, dtype):
    """block dropout of F.linear(x, weight, bias) in dtype, over the output flattened to (M, N);
    the linear layer is the site's only matmul, so the mask is drawn inside."""
    mask = draw_block_mask(flattened_rows(x), weight.shape[0], p, block, device=x.device)
    bias = None if bias is None else bias.to(dtype)
    return linear_dropout_with_mask(x.to(dtype), weight.to(dtype), bias, mask)


def _transposed(graph, match):
    if not match.weight_transposed:
        return match.weight
    weight = graph.call_function(torch.t, (match.weight,))
    _example_value(weight, torch.t, match.weight)
    return weight


def _swap(old, new):
    """Let new take old's place: its metadata, its users; old leaves the graph."""
    for key in ("example_value", "stack_trace", "nn_module_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def _output_replacements(graph, site, block):
    """One output-side site's new node: its matmul becomes linear_then_block_dropout (the
    dropout's users then read what the dropout read: the same views and scalings, of the
    dropped output)."""
    (matmul, match), dtype = site.matches[0], site.matches[0][1].dtype
    with graph.inserting_before(matmul):
        args = (match.operand, _transposed(graph, match), match.bias, site.p, block, dtype)
        return [(matmul, graph.call_function(linear_then_block_dropout, args))]


def _input_replacements(graph, site, block, samples_per_group):
    """One input-side site's new nodes, each built before the matmul it replaces (where all its
    inputs exist), the mask drawn before the first of them: [(matmul, its replacement)]."""
    dropout = site.node
    operand = site.matches[0][1].operand
    operand = dropout.args[0] if operand is dropout else operand
    order = {node: index for index, node in enumerate(graph.nodes)}
    conv = site.matches[0][1].conv
    with graph.inserting_before(min((consumer for consumer, _ in site.matches), key=order.__getitem__)):
        mask_args = () if conv else _draw(graph, site, operand, block)
    replacements = []
    for consumer, match in site.matches:
        with graph.inserting_before(consumer):
            weight = _transposed(graph, match)
            if conv:
                args = (operand, weight, match.bias, conv, site.p, site.policy, samples_per_group, match.dtype)
                replacement = graph.call_function(conv2d_under_channel_mask, args)
            elif site.policy == "slice":
                replacement = graph.call_function(
                    linear_under_window, (operand, weight, match.bias, *mask_args, match.dtype)
                )
            else:
                replacement = graph.call_function(
                    linear_under_mask, (operand, weight, match.bias, *mask_args, match.dtype)
                )
        replacements.append((consumer, replacement))
    return replacements


def _replayed_mask(graph, match):
    """β of the scores' chain α · q kᵀ + β (attention_patterns.py): the chain's nodes copied onto a
    zero score, a masked_fill as the torch.where it equals (which broadcasts its input)."""
    if not match.masked:
        return None
    qk = match.chain[0][1]
    zero_like = meta_value(qk)
    value = {qk: graph.call_function(torch.zeros, ((),), {"dtype": zero_like.dtype, "device": zero_like.device})}
    for node, source, step in match.chain:
        if step == "fill" and node.target is not torch.where:
            new = graph.call_function(torch.where, (node.args[1], node.args[2], value[source]))
        else:
            new = graph.node_copy(node, lambda arg: value.get(arg, arg))
            new.meta.pop("example_value", None)
        value[node] = new
    return new


def _attention_replacements(graph, site, block):
    """An attention site's new node: the fused op in place of P @ V (eager) or of the SDPA call."""
    (node, match), dtype = site.matches[0], site.matches[0][1].dtype
    eager = site.pattern == "attention_dropout"
    policy = "dropkey" if site.policy == "dropkey" else "dropout"
    if match.key_t is None:  # multi_head_attention_forward
        kwargs = {**node.kwargs, "block": block, "policy": policy}
        with graph.inserting_before(node):
            return [(node, graph.call_function(multi_head_attention_under_block_dropout, node.args, kwargs))]
    with graph.inserting_before(node):
        attn_mask = _replayed_mask(graph, match) if eager else match.attn_mask
        args = (match.q, match.key_t, match.v, attn_mask, site.p, match.is_causal, match.scale, match.enable_gqa)
        args += (block, dtype, match.tensor_scales if eager else None, policy)
        return [(node, graph.call_function(attention_under_block_dropout, args))]


def _loss_replacements(graph, site):
    """A loss site's new node: the hashed loss in place of the cross_entropy call."""
    node, match = site.matches[0]
    out = meta_value(node)
    with graph.inserting_before(node):
        weight = _transposed(graph, match)
        args = (match.operand, weight, match.bias, match.target, site.p, match.ignore_index, match.reduction)
        args += (match.dtype, out.dtype if out is not None else torch.float32)
        return [(node, graph.call_function(hashed_loss, args))]


def _erase_unused(graph, nodes):
    """Erase those of nodes (latest first) that nothing reads any more."""
    present = set(graph.nodes)
    for node in nodes:
        if node in present and not node.users:
            graph.erase_node(node)


def rewrite_site(graph, site, block, samples_per_group=8):
    """Replace one decided site (site.rewritten) in graph, which holds site.node; returns
    {replaced node: its replacement}. All new nodes are built first: if that fails, they are
    removed again and the graph is as it was."""
    before = set(graph.nodes)
    try:
        if site.side == "attention":
            replacements = _attention_replacements(graph, site, block)
        elif site.side == "loss":
            replacements = _loss_replacements(graph, site)
        elif site.side == "output":
            replacements = _output_replacements(graph, site, block)
        else:
            replacements = _input_replacements(graph, site, block, samples_per_group)
    except Exception:
        for node in reversed([node for node in graph.nodes if node not in before]):
            graph.erase_node(node)
        raise
    for old, new in replacements:
        _swap(old, new)
    if site.side != "loss" and site.pattern != "sdpa_dropout":  # the site's node was replaced above
        site.node.replace_all_uses_with(site.node.args[0])  # its users read the dropped result now
        graph.erase_node(site.node)
    if site.pattern in ("attention_dropout", "hashed_outputs"):
        _erase_unused(graph, site.matches[0][1].dead)
    return dict(replacements)


def _draw(graph, site, operand, block):
    """The nodes drawing the site's mask, as the arguments its matmuls take after their operands."""
    if site.policy == "slice":
        window = graph.call_function(draw_site_window, (operand, site.p))
        _example_value(window, draw_site_window, operand, site.p)
        return window, site.p
    mask = graph.call_function(draw_site_mask, (operand, site.p, block))
    _example_value(mask, draw_site_mask, operand, site.p, block)
    kept, count = (graph.call_function(operator.getitem, (mask, i)) for i in (0, 1))
    for i, node in enumerate((kept, count)):
        node.meta["example_value"] = (mask.meta.get("example_value") or (None, None))[i]
    return kept, count, site.p, block


def _resolved(site, replaced):
    """site with the nodes its matches name updated for the sites rewritten before it (a
    rewritten matmul may be another site's operand: attention's P @ V before its projection)."""

    def now(value):
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(map(now, value))
        return replaced.get(value, value) if isinstance(value, Node) else value

    site.matches = [
        (now(node), match._replace(**{name: now(getattr(match, name)) for name in match._fields}))
        for node, match in site.matches
    ]
    return site


def rewrite(gm, sites, block, samples_per_group=8):
    """Apply every site marked rewritten, in graph order; returns how many were applied. A site
    whose rewrite fails is left as it was, marked skipped with the reason, and logged. block:
    the tile of the matmul sites; samples_per_group: the sample groups of a block-policy conv2d
    site."""
    replaced, graphs, applied = {}, {}, 0
    for site in (site for site in sites if site.rewritten):
        graph = site.node.graph  # gm's, or a checkpointed body's
        try:
            replaced |= rewrite_site(graph, _resolved(site, replaced), block, samples_per_group)
        except Exception as error:
            log.warning("slicecompile: rewriting dropout %s failed; it stays as it was", site.name, exc_info=True)
            site.rewritten, site.matches = False, []
            site.reason = f"the rewrite failed: {type(error).__name__}: {error}"
            continue
        graphs[id(graph)] = graph
        applied += 1
    for graph in graphs.values():
        graph.lint()
        graph.owning_module.recompile()
    return applied
