"""Attention through torch.compile(backend="slicecompile"): eager attention (softmax → dropout →
@ v, the attention_dropout row) and F.scaled_dot_product_attention with dropout_p (sdpa_dropout)
become the fused block-dropout attention. Forward and gradients equal the dense reference under
the tile mask the compiled graph drew (Inductor's fallback_random draws it with eager's
generator, after the same torch.manual_seed); what cannot be fused keeps its reason. Under
options={"attention": "dropkey"} every kind of site runs the DropKey policy."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

from slicecompile import draw_attention_mask, dropout_attention, dropout_attention_reference, explain

from tolerance import assert_close

P, BLOCK = 0.5, (16, 16)
OPTIONS = {"block": BLOCK, "min_gemm_size": 0, "fallback_random": True}
DROPKEY = {**OPTIONS, "attention": "dropkey"}


def causal_keep(lq, lk):
    return torch.ones(lq, lk, dtype=torch.bool).tril()


class EagerAttention(nn.Module):
    """q @ kᵀ, scaled ("div" by √E, "mul" by 1/√E, or "tensor": divided by a 0-d tensor), masked
    (None, "additive", "masked_fill" or "where", causal), cast to float32 and back when cast,
    softmax, dropout, @ v. reference() is the same attention in SDPA's terms."""

    def __init__(self, scale="div", mask=None, cast=False):
        super().__init__()
        self.scale, self.mask, self.cast = scale, mask, cast

    def forward(self, q, k, v):
        e = q.shape[-1]
        scores = q @ k.transpose(-2, -1)
        if self.scale == "div":
            scores = scores / math.sqrt(e)
        elif self.scale == "mul":
            scores = scores * (1 / math.sqrt(e))
        else:
            scores = scores / torch.full((), math.sqrt(e), dtype=q.dtype, device=q.device)
        keep = causal_keep(q.shape[-2], k.shape[-2]).to(q.device)
        if self.mask == "additive":
            scores = scores + torch.zeros(keep.shape, device=q.device).masked_fill(~keep, -1e9)
        elif self.mask == "masked_fill":
            scores = scores.masked_fill(~keep, float("-inf"))
        elif self.mask == "where":
            scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
        probs = scores.float().softmax(dim=-1).to(q.dtype) if self.cast else scores.softmax(dim=-1)
        return F.dropout(probs, P) @ v

    def reference(self, q, k, v, mask):
        keep = causal_keep(q.shape[-2], k.shape[-2]) if self.mask else None
        return dropout_attention_reference(q, k, v, mask, attn_mask=keep)


class Sdpa(nn.Module):
    def __init__(self, is_causal=False, mask=None):
        super().__init__()
        self.is_causal, self.mask = is_causal, mask

    def forward(self, q, k, v, attn_mask=None):
        p = P if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=p, is_causal=self.is_causal)

    def reference(self, q, k, v, mask, attn_mask=None):
        return dropout_attention_reference(q, k, v, mask, attn_mask=attn_mask, is_causal=self.is_causal)


def check_step(model, shapes, compiled=None, extra=(), options=OPTIONS):
    """A compiled forward + backward against the float64 reference under the mask the compiled
    graph drew; extra: more differentiable inputs (an additive mask with a gradient)."""
    if compiled is None:
        compiled = torch.compile(model, backend="slicecompile", options=options, fullgraph=True)
    leaves = [torch.randn(shape, requires_grad=True) for shape in shapes] + list(extra)
    torch.manual_seed(7)
    out = compiled(*leaves)
    grad = torch.randn_like(out)
    actual = [out, *torch.autograd.grad(out, leaves, grad)]
    q, k = leaves[0], leaves[1]
    plane = (q.shape[0], q.shape[1]) if q.dim() == 4 else (1, q.shape[0])
    torch.manual_seed(7)
    policy, is_causal = options.get("attention", "dropout"), getattr(model, "is_causal", False)
    mask = draw_attention_mask(*plane, q.shape[-2], k.shape[-2], P, BLOCK, policy=policy, is_causal=is_causal)
    refs = {}
    for dtype in (torch.float64, torch.float32):
        inputs = [t.detach().to(dtype).requires_grad_() for t in leaves]
        ref = model.reference(*inputs[:3], mask, *inputs[3:])
        refs[dtype] = [ref, *torch.autograd.grad(ref, inputs, grad.to(dtype))]
    names = ["out", "dq", "dk", "dv", "d attn_mask"][: len(actual)]
    for name, value, ref64, ref32 in zip(names, actual, refs[torch.float64], refs[torch.float32], strict=True):
        assert_close(value, ref64, ref32, name)


EAGER = {
    "div": EagerAttention("div"),
    "mul, additive mask": EagerAttention("mul", "additive"),
    "tensor scale, masked_fill": EagerAttention("tensor", "masked_fill"),
    "where, casts": EagerAttention("div", "where", cast=True),
}


@pytest.mark.parametrize("model", EAGER.values(), ids=EAGER.keys())
def test_eager_attention_matches_reference_under_the_drawn_mask(model):
    check_step(model, [(2, 2, 40, 16), (2, 2, 40, 16), (2, 2, 40, 8)])
    assert counters["slicecompile"]["rewritten_attention_dropout"] == 1, counters["slicecompile"]


def test_three_dimensional_eager_attention():
    """(batch · heads, L, E) operands, as bmm-based attention has them: one plane per batch."""
    check_step(EagerAttention("div", "masked_fill"), [(3, 24, 16), (3, 24, 16), (3, 24, 16)])
    assert counters["slicecompile"]["rewritten_attention_dropout"] == 1


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_reference_under_the_drawn_mask(is_causal):
    check_step(Sdpa(is_causal), [(2, 3, 40, 16), (2, 3, 24, 16), (2, 3, 24, 32)])
    assert counters["slicecompile"]["rewritten_sdpa_dropout"] == 1


def test_sdpa_with_an_additive_mask_gets_its_gradient():
    """T5's position bias: an additive attn_mask that requires grad."""
    bias = (torch.randn(1, 3, 40, 24) / 2).requires_grad_()
    check_step(Sdpa(), [(2, 3, 40, 16), (2, 3, 24, 16), (2, 3, 24, 16)], extra=[bias])


def test_dynamic_sequence_length_compiles_once():
    model = EagerAttention("div", "masked_fill")
    compiled = torch.compile(model, backend="slicecompile", options=OPTIONS, dynamic=True)
    for length in (32, 48, 40):
        check_step(model, [(2, 2, length, 16)] * 3, compiled)
    # One compile for the three lengths (graphs may count a retrace that made √E a constant).
    assert counters["slicecompile"]["sites"] == counters["slicecompile"]["rewritten"] == 1, counters["slicecompile"]


class CheckpointedSdpa(Sdpa):
    def forward(self, q, k, v):
        return checkpoint(super().forward, q, k, v, use_reentrant=False)


def test_checkpointed_attention_recomputes_under_the_forward_mask():
    check_step(CheckpointedSdpa(), [(2, 2, 40, 16)] * 3)
    assert counters["slicecompile"]["rewritten_sdpa_dropout"] == 1


class TorchAttention(nn.Module):
    """nn.MultiheadAttention: with need_weights=False it calls SDPA; with the default
    need_weights=True it returns the (dropped) probabilities averaged over the heads."""

    def __init__(self, need_weights):
        super().__init__()
        self.need_weights = need_weights
        self.attention = nn.MultiheadAttention(32, 2, dropout=P, batch_first=True)

    def forward(self, x):
        out, weights = self.attention(x, x, x, need_weights=self.need_weights)
        return out if weights is None else out + weights.sum()


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=P, batch_first=True)

    def forward(self, x):
        return self.layer(x)


def test_torch_attention_modules():
    x = torch.randn(2, 24, 32)
    for model in (TorchAttention(need_weights=False), EncoderLayer()):
        report = explain(model, x, options=OPTIONS)
        sdpa = [s for s in report.sites if s.pattern == "sdpa_dropout"]
        assert [(s.rewritten, s.p) for s in sdpa] == [(True, P)], str(report)
        compiled = torch.compile(model, backend="slicecompile", options=OPTIONS)
        compiled(x).square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    (site,) = explain(TorchAttention(need_weights=True), x, options=OPTIONS).sites
    assert not site.rewritten and "need_weights=True returns them" in site.reason, site.reason


class ProbabilitiesReturned(nn.Module):
    def forward(self, q, k, v):
        probs = F.dropout((q @ k.transpose(-2, -1)).softmax(-1), P)
        return probs @ v, probs


class HeadMask(nn.Module):
    def forward(self, q, k, v):
        return F.dropout((q @ k.transpose(-2, -1)).softmax(-1), P) * q[..., :1] @ v


class NotAttention(nn.Module):
    def forward(self, q, k, v):
        return F.dropout(q @ k.transpose(-2, -1), P) @ v


class ZeroFill(nn.Module):
    def forward(self, q, k, v):
        scores = (q @ k.transpose(-2, -1)).masked_fill(causal_keep(q.shape[-2], k.shape[-2]), 0.0)
        return F.dropout(scores.softmax(-1), P) @ v


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        return F.dropout((q @ k.transpose(-2, -1)).softmax(-2), P) @ v


class SdpaEval(Sdpa):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)


NEGATIVES = {
    "probabilities returned": (ProbabilitiesReturned, "used by output (not a matmul input)"),
    "head mask": (HeadMask, "used by mul (not a matmul input)"),
    "not attention": (NotAttention, "batched matmul that is not attention"),
    "zero fill": (ZeroFill, "a fill that is not a constant <= -10000"),
    "softmax over queries": (SoftmaxOverQueries, "softmax over dim -2, not over the keys"),
    "sdpa without dropout": (SdpaEval, "p = 0"),
}


@pytest.mark.parametrize("case", NEGATIVES.values(), ids=NEGATIVES.keys())
def test_sites_that_stay_as_they_are(case):
    model, reason = case
    q = torch.randn(2, 2, 24, 16)
    (site,) = explain(model(), q, q, q, options=OPTIONS).sites
    assert not site.rewritten and reason in site.reason, site.reason


def test_explain_counts_the_attention_gemms():
    """Both GEMMs over all heads; the default policy computes every tile (a dropped tile's P is
    zeroed, not skipped), so no FLOPs are saved."""
    q, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 8)
    (site,) = explain(Sdpa(), q, q, v, options=OPTIONS).sites
    assert site.rewritten and site.gemms == ((240, 16, 40), (240, 40, 8))
    assert site.saved_flops == 0 and site.dense_flops == 6 * 240 * 40 * (16 + 8)


DROPKEY_SITES = {
    "causal sdpa": (lambda: Sdpa(is_causal=True), [(1, 2, 40, 16), (1, 2, 24, 16), (1, 2, 24, 16)], "sdpa_dropout"),
    "eager": (lambda: EagerAttention("div", "masked_fill"), [(2, 2, 40, 16)] * 3, "attention_dropout"),
}


@pytest.mark.parametrize("case", DROPKEY_SITES.values(), ids=DROPKEY_SITES.keys())
def test_dropkey_option_rewrites_attention_under_that_policy(case):
    """The site says its policy (explain's policy column), and the compiled step is the DropKey
    reference under the mask the compiled graph drew."""
    make, shapes, pattern = case
    report = explain(make(), *(torch.randn(shape) for shape in shapes), options=DROPKEY)
    (site,) = report.sites
    assert (site.pattern, site.policy, site.rewritten) == (pattern, "dropkey", True), str(report)
    assert str(report).splitlines()[2].split()[-5:] == ["attention", "dropkey", "-", "yes", "rewritten"]
    check_step(make(), shapes, options=DROPKEY)
    assert counters["slicecompile"][f"rewritten_{pattern}"] == 1


def test_multihead_attention_under_dropkey(monkeypatch):
    """nn.MultiheadAttention's SDPA call runs the op under the policy: the compiled step equals
    the eager module with SDPA replaced by dropout_attention(..., policy="dropkey")."""
    model, x = TorchAttention(need_weights=False), torch.randn(2, 24, 32)
    (site,) = explain(model, x, options=DROPKEY).sites
    assert (site.policy, site.rewritten) == ("dropkey", True)
    torch.manual_seed(7)
    compiled = torch.compile(model, backend="slicecompile", options=DROPKEY)(x)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return dropout_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, BLOCK, policy="dropkey")

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    torch.manual_seed(7)
    torch.testing.assert_close(compiled, model(x))


def test_dropkey_skips_every_gemm_of_a_dropped_tile():
    """explain's saving under DropKey: a share p of all six GEMMs (q kᵀ, dQ and dK too)."""
    q, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 8)
    (site,) = explain(Sdpa(), q, q, v, options=DROPKEY).sites
    assert site.saved_flops == round(P * site.dense_flops) == round(P * 6 * 240 * 40 * (16 + 8))
