"""options={"hashed_outputs": active}: cross_entropy(linear(x) [→ views, casts], target) becomes
hashed_linear_cross_entropy. The compiled loss and gradients against the float64 reference over
the same tiles (a fixed tile choice stands in for SimHash, whose projections the compiled graph
draws from Inductor's generator); the skips; evaluation; a dynamic batch under fullgraph."""

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.backends.debugging import aot_eager_decomp_partition
from torch._dynamo.utils import counters

import slicecompile
import slicecompile.compiler.backend as backend
from slicecompile.compiler.options import parse_options
from slicecompile.ops import hashed_linear_cross_entropy_reference

from conftest import DEVICE
from tolerance import assert_close

hashed = importlib.import_module("slicecompile.ops.hashed_linear_cross_entropy")  # the package's name is the op
N, E, ACTIVE = 1000, 32, 0.25  # 8 tiles of 128 classes, 2 active a block-row
OPTIONS = {"hashed_outputs": ACTIVE, "min_gemm_size": 0}


@pytest.fixture(autouse=True)
def eager_inductor(monkeypatch):
    """AOTAutograd with Inductor's decompositions and eager kernels in place of Inductor's codegen."""
    monkeypatch.setattr(backend, "_inductor", lambda gm, inputs, mode, options: aot_eager_decomp_partition(gm, inputs))


@pytest.fixture
def fixed_tiles(monkeypatch):
    """Every block-row computes tiles 1 and 3 (labels elsewhere reach their rows as extra logits)."""

    def select(x2d, weight, target, budget, block, *_):
        rows = -(-x2d.shape[0] // block[0])
        return torch.tensor([1, 3], device=x2d.device).expand(rows, budget).contiguous()

    monkeypatch.setattr(hashed, "select_tiles", select)
    return torch.tensor([1, 3])


class Head(nn.Module):
    """An LM head and its loss, written five ways."""

    def __init__(self, kind="view_float", bias=True, reduction="mean", ignore_index=-100):
        super().__init__()
        self.kind, self.reduction, self.ignore_index = kind, reduction, ignore_index
        self.head = nn.Linear(E, N, bias=bias)
        self.loss = nn.CrossEntropyLoss(reduction=reduction, ignore_index=ignore_index)

    def forward(self, h, target):
        if self.kind == "matmul":
            logits = h @ self.head.weight.t()
        else:
            logits = self.head(h)
        if self.kind == "module_loss":
            return self.loss(logits.view(-1, N), target.view(-1))
        if self.kind == "to_dtype":
            logits = logits.reshape(-1, N).to(torch.float32)
        else:
            logits = logits.view(-1, N).float()
        return F.cross_entropy(logits, target.view(-1), ignore_index=self.ignore_index, reduction=self.reduction)


def targets(batch=3, length=24, ignored=True):
    target = torch.randint(0, N, (batch, length))
    if ignored:
        target[0, :5] = -100
    return target


CASES = {
    "linear, view, float": Head(),
    "nn.CrossEntropyLoss, sum": Head("module_loss", reduction="sum"),
    "@ weight.t(), no bias": Head("matmul", bias=False),
    "to(float32), none": Head("to_dtype", reduction="none"),
}


@pytest.mark.parametrize("model", CASES.values(), ids=CASES.keys())
def test_compiled_loss_matches_the_reference_over_the_same_tiles(model, fixed_tiles):
    model = model.to(DEVICE)  # made at import, before the suite's default device is set
    h, target = torch.randn(3, 24, E, requires_grad=True), targets()
    compiled = torch.compile(model, backend="slicecompile", options=OPTIONS, fullgraph=True)
    loss = compiled(h, target)
    assert counters["slicecompile"]["rewritten_hashed_outputs"] == 1, dict(counters["slicecompile"])
    cotangent = torch.rand_like(loss)
    leaves = [h, *model.head.parameters()]
    actual = [loss, *torch.autograd.grad(loss, leaves, cotangent)]
    tiles = fixed_tiles.expand(-(-72 // hashed.DEFAULT_HASHED_BLOCK[0]), 2)
    refs = {}
    for dtype in (torch.float64, torch.float32):
        inputs = [t.detach().to(dtype).requires_grad_() for t in leaves]
        bias = inputs[2] if len(inputs) > 2 else None
        ref = hashed_linear_cross_entropy_reference(
            inputs[0], inputs[1], target, tiles, bias, ignore_index=-100, reduction=model.reduction
        ).reshape(loss.shape)
        refs[dtype] = [ref, *torch.autograd.grad(ref, inputs, cotangent.to(dtype))]
    for name, value, ref64, ref32 in zip(["loss", "dh", "dW", "db"], actual, refs[torch.float64], refs[torch.float32]):
        assert_close(value, ref64, ref32, name)


def test_sampled_loss_is_at_most_the_full_loss_under_a_dynamic_batch():
    """SimHash's own tiles: a softmax over a subset of the classes that holds the label gives each
    row a loss no larger than the full softmax's; batch sizes vary without a recompile failing."""
    model = Head(ignore_index=-7)
    compiled = torch.compile(model, backend="slicecompile", options=OPTIONS, fullgraph=True, dynamic=True)
    for batch in (2, 5):
        h, target = torch.randn(batch, 24, E), targets(batch, ignored=False)
        sampled = compiled(h, target)
        with torch.no_grad():
            full = F.cross_entropy(model.head(h).view(-1, N), target.view(-1))
        assert 0 < sampled <= full + 1e-5, (sampled, full)
    assert counters["slicecompile"]["rewritten_hashed_outputs"] >= 1, dict(counters["slicecompile"])


def test_without_gradients_the_loss_is_the_full_loss():
    """Up to rounding: the compiled graph decomposes the loss (bitwise equal in some runs only)."""
    model, h, target = Head(), torch.randn(3, 24, E), targets()
    compiled = torch.compile(model, backend="slicecompile", options=OPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(compiled(h, target), model(h, target), rtol=1e-6, atol=0)


class ReturnsLogits(Head):
    def forward(self, h, target):
        logits = self.head(h)
        return F.cross_entropy(logits.view(-1, N), target.view(-1)), logits


class Smoothed(Head):
    def forward(self, h, target):
        return F.cross_entropy(self.head(h).view(-1, N), target.view(-1), label_smoothing=0.1)


class Weighted(Head):
    def forward(self, h, target):
        return F.cross_entropy(self.head(h).view(-1, N), target.view(-1), weight=torch.ones(N))


class AfterGelu(Head):
    def forward(self, h, target):
        return F.cross_entropy(F.gelu(self.head(h)).view(-1, N), target.view(-1))


class DroppedHead(Head):
    def forward(self, h, target):
        return F.cross_entropy(self.head(F.dropout(h, 0.5)).view(-1, N), target.view(-1))


SKIPS = {
    "logits returned": (ReturnsLogits(), "the logits are read elsewhere too: output", OPTIONS),
    "label smoothing": (Smoothed(), "label smoothing", OPTIONS),
    "class weights": (Weighted(), "class weights (weight=...)", OPTIONS),
    "gelu": (AfterGelu(), "the logits are not a linear layer's output (gelu)", OPTIONS),
    "too few tiles": (Head(), "too few output tiles to pay: 5 of 8 tiles", {**OPTIONS, "hashed_outputs": 0.6}),
    "dropout before the head": (DroppedHead(), "the linear's input is block-dropped already by", OPTIONS),
}


@pytest.mark.parametrize("model, reason, options", SKIPS.values(), ids=SKIPS.keys())
def test_skips_with_a_reason(model, reason, options):
    model = model.to(DEVICE)  # made at import, before the suite's default device is set
    *_, site = slicecompile.explain(model, torch.randn(2, 24, E), targets(2), options=options).sites
    assert (site.pattern, site.rewritten) == ("hashed_outputs", False) and site.reason.startswith(reason), site


def test_explain_lists_the_active_share_and_the_saving():
    report = slicecompile.explain(Head(), torch.randn(2, 24, E), targets(2), options=OPTIONS)
    (site,) = report.sites
    assert (site.side, site.p, site.gemms, site.consumer) == ("loss", ACTIVE, ((48, E, N),), "linear")
    assert report.saved_flops == round(6 * 48 * E * N * (1 - 4 / 3 * ACTIVE))


def test_off_by_default():
    assert slicecompile.explain(Head(), torch.randn(2, 24, E), targets(2), options={"min_gemm_size": 0}).sites == []


@pytest.mark.parametrize("active", [0, 1.5, "0.1", True])
def test_bad_active_share(active):
    with pytest.raises(ValueError, match="hashed_outputs must be None or an active share in"):
        parse_options({"hashed_outputs": active})
