"""The FX pass on Dynamo's graphs, without Inductor: each positive case comes as a quartet
(module, expected rewrite, output against the dense reference under the same mask,
graph.lint()); each negative case must leave the graph untouched, with its reason."""

import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slicecompile import draw_attention_mask, draw_block_mask
from slicecompile.compiler.graphs import graph_modules
from slicecompile.compiler.options import Options
from slicecompile.compiler.patterns import is_dropout, is_scaling
from slicecompile.compiler.rewrite import rewrite
from slicecompile.compiler.sites import find_sites
from slicecompile.ops.dropout_conv2d import draw_channel_mask

from models_by_others import EXPECTED, example_input
from tolerance import assert_close

P, BLOCK = 0.5, (16, 16)
ALWAYS = Options(block=BLOCK, min_gemm_size=0)


def dynamo_graph(model, *args):
    """Dynamo's FX graph of model(*args) and the real tensors it was traced with."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(model, backend=capture, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def attention_masked(seed):
    """masked(probs) for attention probabilities (B, H, Lq, Lk), or (H, Lq, Lk) as batch 1: the
    tile mask the fused attention draws after torch.manual_seed(seed)."""

    def masked(probs):
        torch.manual_seed(seed)
        planes = probs if probs.dim() == 4 else probs.unsqueeze(0)
        mask = draw_attention_mask(*planes.shape, P, BLOCK)
        return (planes * mask.elements().to(probs.dtype) * mask.scale).reshape(probs.shape)

    return masked


def block_masked(seed):
    """masked(t): t, flattened to (-1, K), under the block mask the rewritten graph draws
    first after torch.manual_seed(seed); one mask for every call, like the graph's."""
    masks = []

    def masked(t):
        rows = t.reshape(-1, t.shape[-1])
        if not masks:
            torch.manual_seed(seed)
            masks.append(draw_block_mask(*rows.shape, P, BLOCK))
        mask = masks[0]
        return (rows * mask.elements().to(t.dtype) * mask.scale).reshape(t.shape)

    return masked


class Linear3d(nn.Module):
    pattern, shape = "dropout_linear", (2, 24, 32)

    def __init__(self):
        super().__init__()
        self.drop, self.fc = nn.Dropout(P), nn.Linear(32, 24)

    def forward(self, x):
        return self.fc(self.drop(x))

    def reference(self, x, masked):
        return self.fc(masked(x))


class MatmulOperator(nn.Module):
    pattern, shape = "dropout_matmul", (2, 24, 32)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 32))

    def forward(self, x):
        return F.dropout(x, P, training=self.training) @ self.w.t()

    def reference(self, x, masked):
        return masked(x) @ self.w.t()


class MmMethod(nn.Module):
    pattern, shape = "dropout_matmul", (2, 24, 32)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 24))

    def forward(self, x):
        return torch.dropout(x.reshape(-1, 32), P, True).mm(self.w)

    def reference(self, x, masked):
        return masked(x.reshape(-1, 32)) @ self.w


class Addmm(nn.Module):
    pattern, shape = "dropout_addmm", (48, 32)

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(24, 32)), nn.Parameter(torch.randn(24))

    def forward(self, x):
        return torch.addmm(self.b, F.dropout(x, P), self.w.t())

    def reference(self, x, masked):
        return masked(x) @ self.w.t() + self.b


class ReshapeBetween(nn.Module):
    """Heads merged after the dropout: the mask covers the merged (tokens, features) plane."""

    pattern, shape = "dropout_linear", (2, 24, 4, 8)

    def __init__(self):
        super().__init__()
        self.drop, self.fc = nn.Dropout(P), nn.Linear(32, 24)

    def forward(self, x):
        return self.fc(self.drop(x).reshape(2, 24, 32))

    def reference(self, x, masked):
        return self.fc(masked(x.reshape(2, 24, 32)))


class ScaledBetween(Linear3d):
    """A scale by a number commutes with the mask (T5 scales its decoder's output before lm_head)."""

    def forward(self, x):
        return self.fc(2.0 * self.drop(x) / 4)

    def reference(self, x, masked):
        return self.fc(2.0 * masked(x) / 4)


class TransposeBetween(nn.Module):
    pattern, shape = "dropout_matmul", (2, 32, 24)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 32))

    def forward(self, x):
        return torch.matmul(F.dropout(x, P).transpose(1, 2), self.w.t())

    def reference(self, x, masked):
        return masked(x.transpose(1, 2)) @ self.w.t()


class SharedByTwoLinears(nn.Module):
    """Q and K projections of one dropped input share its mask."""

    pattern, shape = "dropout_linear", (2, 24, 32)

    def __init__(self):
        super().__init__()
        self.drop, self.q, self.k = nn.Dropout(P), nn.Linear(32, 24), nn.Linear(32, 16, bias=False)

    def forward(self, x):
        dropped = self.drop(x)
        return self.q(dropped), self.k(dropped)

    def reference(self, x, masked):
        return self.q(masked(x)), self.k(masked(x))


class AttentionBmm(nn.Module):
    """Attention probabilities → dropout → bmm with V: the fused attention, its tiles covering
    each (query, key) plane."""

    pattern, shape, attention = "attention_dropout", (3, 24, 32), True

    def forward(self, x):
        return torch.bmm(F.dropout((x @ x.transpose(1, 2)).softmax(dim=-1), P), x)

    def reference(self, x, masked):
        return masked((x @ x.transpose(1, 2)).softmax(dim=-1)) @ x


class AttentionHeads4d(AttentionBmm):
    """(batch, heads, query, key) probabilities @ (batch, heads, key, head_dim) values."""

    shape = (2, 2, 24, 16)

    def forward(self, x):
        return F.dropout((x @ x.transpose(-2, -1)).softmax(dim=-1), P) @ x

    def reference(self, x, masked):
        return masked((x @ x.transpose(-2, -1)).softmax(dim=-1)) @ x


def channel_masked(seed):
    """masked(t) for a conv2d's input (N, C, H, W): the block policy's channel mask."""

    def masked(t):
        torch.manual_seed(seed)
        mask = draw_channel_mask(*t.shape[:2], P, "block")
        return t * mask.factors().to(t.dtype)[:, :, None, None]

    return masked


class Checkpointed(Linear3d):
    """The site inside torch.utils.checkpoint's region, which Dynamo makes a subgraph."""

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(lambda t: self.fc(self.drop(t)), x, use_reentrant=False)


class ConvAfterDropout(nn.Module):
    """Ragged on both axes of the mask: 10 samples (groups of 8), 20 channels (blocks of 16)."""

    pattern, shape, masked = "dropout_conv2d", (10, 20, 6, 6), channel_masked

    def __init__(self):
        super().__init__()
        self.drop, self.conv = nn.Dropout(P), nn.Conv2d(20, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(self.drop(x))

    def reference(self, x, masked):
        return self.conv(masked(x))


POSITIVE = [Linear3d, MatmulOperator, MmMethod, Addmm, ReshapeBetween, ScaledBetween, TransposeBetween]
POSITIVE += [SharedByTwoLinears]
POSITIVE += [AttentionBmm, AttentionHeads4d, ConvAfterDropout, Checkpointed]


@pytest.mark.parametrize("case", POSITIVE, ids=lambda case: case.__name__)
def test_rewrites_and_matches_reference(case):
    torch.manual_seed(0)
    model, x = case(), torch.randn(case.shape)
    gm, inputs = dynamo_graph(model, x)
    sites = find_sites(gm, ALWAYS)
    assert [(site.pattern, site.rewritten, site.reason) for site in sites] == [(case.pattern, True, "rewritten")]

    assert rewrite(gm, sites, BLOCK) == 1
    for sub, _ in graph_modules(gm):
        sub.graph.lint()
        assert not any(is_dropout(node) for node in sub.graph.nodes)
    torch.manual_seed(1)
    actual = gm(*inputs)

    masked = attention_masked if getattr(case, "attention", False) else block_masked
    masked = getattr(case, "masked", masked)
    same = model.reference(x, masked(seed=1))
    wide = copy.deepcopy(model).double().reference(x.double(), masked(seed=1))
    for i, (out, out64, out32) in enumerate(
        zip(*(torch.utils._pytree.tree_leaves(t) for t in (actual, wide, same)), strict=True)
    ):
        assert_close(out, out64, out32, f"output {i}")


class ExtraUser(Linear3d):
    def forward(self, x):
        dropped = self.drop(x)
        return self.fc(dropped), dropped.sum()


class DropoutAdd(Linear3d):
    def forward(self, x):
        return x + self.drop(x)


class ScaledByTensor(Linear3d):
    def forward(self, x):
        return self.fc(self.drop(x) * x)


class DropoutOnWeight(Linear3d):
    def forward(self, x):
        return F.linear(x, F.dropout(self.fc.weight, P))


class DropoutAsRightOperand(Linear3d):
    def forward(self, x):
        return self.fc.weight @ self.drop(x[0].t())


class BroadcastBatch(Linear3d):
    def forward(self, x):
        probs = (x @ x.transpose(1, 2)).softmax(dim=-1)
        return self.drop(probs) @ x[:1]


class DifferentViews(Linear3d):
    def forward(self, x):
        dropped = self.drop(x)
        return self.fc(dropped), self.fc(dropped.reshape(-1, 32))


class InplaceOnSharedInput(Linear3d):
    def forward(self, x):
        hidden = x * 2
        dropped = F.dropout(hidden, P, inplace=True)
        return self.fc(dropped), hidden


def _eval(case):
    return lambda: case().eval()


def _double(case):
    return lambda: case().double()


NEGATIVE = {
    "extra_user": (ExtraUser, ALWAYS, "used by sum (not a matmul input)"),
    "dropout_add": (DropoutAdd, ALWAYS, "used by add (not a matmul input)"),
    "scaled_by_tensor": (ScaledByTensor, ALWAYS, "used by mul (not a matmul input)"),
    "eval": (_eval(Linear3d), ALWAYS, "eval mode (training=False)"),
    "p0": (lambda: Linear3d().apply(lambda m: setattr(m, "p", 0.0)), ALWAYS, "p = 0 (dropout is the identity)"),
    "float64": (_double(Linear3d), ALWAYS, "unsupported dtype torch.float64"),
    "small_gemm": (
        Linear3d,
        Options(),
        "GEMM too small: 0.012 µs forward+backward at an H100's peaks (bytes-bound) < 1 µs",
    ),
    "disabled": (Linear3d, Options(enabled=False, min_gemm_size=0), "disabled by options"),
    "dropout_on_weight": (DropoutOnWeight, ALWAYS, "used by linear as another operand than its input"),
    "right_operand": (DropoutAsRightOperand, ALWAYS, "used by matmul as another operand than its input"),
    "broadcast_batch": (BroadcastBatch, ALWAYS, "batched matmul with broadcast batch dims"),
    "different_views": (DifferentViews, ALWAYS, "feeds matmuls through different views"),
    "inplace_shared": (InplaceOnSharedInput, ALWAYS, "in-place dropout whose input is read elsewhere"),
}


@pytest.mark.parametrize("name", NEGATIVE)
def test_leaves_graph_alone(name):
    make, options, reason = NEGATIVE[name]
    gm, _ = dynamo_graph(make(), torch.randn(Linear3d.shape, dtype=make().fc.weight.dtype))
    before = gm.code
    sites = find_sites(gm, options)
    assert [(site.rewritten, site.reason) for site in sites] == [(False, reason)]
    assert rewrite(gm, sites, BLOCK) == 0
    assert gm.code == before


class GroupedConv(ConvAfterDropout):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(20, 8, 3, groups=2)


class ConvThroughView(ConvAfterDropout):
    def forward(self, x):
        return self.conv(self.drop(x).contiguous(memory_format=torch.channels_last))


class ReflectPaddedConv(ConvAfterDropout):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(20, 8, 3, padding=1, padding_mode="reflect")


class ConvAndLinear(ConvAfterDropout):
    def forward(self, x):
        dropped = self.drop(x)
        return self.conv(dropped), dropped @ torch.ones(6, 4)


CONV_NEGATIVE = {
    "grouped": (GroupedConv, "grouped convolution (groups != 1)"),
    "through_view": (ConvThroughView, "conv2d input reached through a view or scaling of the dropout"),
    "reflect_padding": (ReflectPaddedConv, "used by pad (not a matmul input)"),
    "conv_and_linear": (ConvAndLinear, "feeds a convolution and other layers"),
}


@pytest.mark.parametrize("name", CONV_NEGATIVE)
def test_leaves_conv_alone(name):
    make, reason = CONV_NEGATIVE[name]
    gm, _ = dynamo_graph(make(), torch.randn(ConvAfterDropout.shape))
    before = gm.code
    sites = find_sites(gm, ALWAYS)
    assert [(site.rewritten, site.reason) for site in sites] == [(False, reason)]
    assert rewrite(gm, sites, BLOCK) == 0
    assert gm.code == before


@pytest.mark.parametrize("name", EXPECTED)
def test_models_written_by_others(name):
    """The expected sites of each model; the rewritten graph lints and runs with the dense
    graph's output shapes (its values are checked by the positive cases above)."""
    make, expected = EXPECTED[name]
    torch.manual_seed(0)
    gm, inputs = dynamo_graph(make(), example_input())
    dense = gm(*inputs)
    sites = find_sites(gm, ALWAYS)
    assert [(site.module, site.reason) for site in sites] == expected
    assert rewrite(gm, sites, BLOCK) == sum(reason == "rewritten" for _, reason in expected)
    gm.graph.lint()
    rewritten = gm(*inputs)
    for out, ref in zip(
        torch.utils._pytree.tree_leaves(rewritten), torch.utils._pytree.tree_leaves(dense), strict=True
    ):
        assert out.shape == ref.shape and torch.isfinite(out).all()


class DropoutInCond(Linear3d):
    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: self.fc(self.drop(t)), lambda t: self.fc(t), (x,))


def test_dropout_inside_control_flow_is_listed_and_left_alone():
    gm, _ = dynamo_graph(DropoutInCond(), torch.randn(Linear3d.shape))
    before = {name: sub.code for name, sub in gm.named_modules() if isinstance(sub, torch.fx.GraphModule)}
    (site,) = find_sites(gm, ALWAYS)
    assert (site.module, site.consumer, site.rewritten) == ("drop", "linear", False)
    assert site.reason == "inside the subgraph cond_true_0 of cond: not supported"
    assert rewrite(gm, [site], BLOCK) == 0
    assert before == {name: sub.code for name, sub in gm.named_modules() if isinstance(sub, torch.fx.GraphModule)}


def test_a_scaling_is_a_number_times_or_over_the_value():
    """Dynamo may turn `1.0 / dropped` into a reciprocal, so this builds its graph by hand."""
    graph = torch.fx.Graph()
    value, other = graph.placeholder("value"), graph.placeholder("other")
    scalings = [graph.call_function(operator.mul, args) for args in ((value, 2.0), (0.5, value))]
    scalings += [graph.call_function(operator.truediv, (value, 4)), graph.call_method("mul", (value, 3))]
    others = [graph.call_function(operator.truediv, (1.0, value)), graph.call_function(operator.mul, (value, other))]
    others += [graph.call_function(operator.mul, (value, True)), graph.call_function(torch.add, (value, 1.0))]
    assert all(is_scaling(node, value) for node in scalings)
    assert not any(is_scaling(node, value) for node in others)
