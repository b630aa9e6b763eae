"""Rewrites compose and fail one site at a time; recompiles keep their sites.

Inductor is replaced by AOTAutograd with eager kernels (aot_eager): the rewritten graph is still
traced by make_fx as Inductor would trace it, without a CPU compile of seconds per graph.
"""

import logging

import pytest
import torch
import torch.nn as nn
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.utils import counters

import slicecompile.compiler.backend as backend
import slicecompile.compiler.rewrite as rewrite

from tolerance import assert_close

TINY_P = 1e-6  # block, slice and element dropout all keep everything
OPTIONS = {"block": (16, 16), "min_gemm_size": 0}


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setattr(backend, "_inductor", lambda gm, example_inputs, mode, options: aot_eager(gm, example_inputs))


class AttentionChain(nn.Module):
    """x + drop2(proj(drop1(softmax(q kᵀ / c)) @ v)), nothing between @ v and proj: the input
    side's batched matmul is the output side's operand."""

    def __init__(self, p, width=32):
        super().__init__()
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.drop1, self.drop2 = nn.Dropout(p), nn.Dropout(p)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return x + self.drop2(self.proj(self.drop1(torch.softmax(q @ k.transpose(-2, -1) / 5.0, dim=-1)) @ v))


def _outputs_and_grads(model, x):
    x = x.detach().requires_grad_()
    out = model(x)
    out.backward(torch.ones_like(out))
    return [out, x.grad] + [param.grad for param in model.parameters()]


def _compare_with_eager(model, x, options):
    """The compiled model at TINY_P against eager (no dropout in effect) in float64 and float32."""
    torch.manual_seed(0)
    compiled = _outputs_and_grads(torch.compile(model, backend="slicecompile", options=options), x)
    model.zero_grad()
    eager32 = _outputs_and_grads(model, x)
    model.zero_grad()
    eager64 = _outputs_and_grads(model.double(), x.double())
    for i, (actual, expected, same_dtype) in enumerate(zip(compiled, eager64, eager32, strict=True)):
        assert_close(actual, expected, same_dtype, f"output/gradient {i}")


def test_rewrites_in_one_chain_compose():
    torch.manual_seed(0)
    _compare_with_eager(AttentionChain(TINY_P), torch.randn(2, 16, 32), OPTIONS)
    stats = counters["slicecompile"]
    assert stats["rewritten_attention_dropout"] == stats["rewritten_linear_dropout"] == 1
    assert stats["rewritten"] == stats["sites"] == 2 and "fallback" not in stats


def test_a_failed_site_is_skipped_alone(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(rewrite, "_output_replacements", broken)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="slicecompile"):
        _compare_with_eager(AttentionChain(TINY_P), torch.randn(2, 16, 32), OPTIONS)
    stats = counters["slicecompile"]
    assert stats["rewritten"] == stats["rewritten_attention_dropout"] == stats["skipped"] == 1
    assert "fallback" not in stats
    assert "rewriting dropout" in caplog.text and "simulated failure" in caplog.text


def _layer(side, k, n):
    if side == "input":
        return nn.Sequential(nn.Dropout(0.5), nn.Linear(k, n))
    return nn.Sequential(nn.Linear(k, n), nn.Dropout(0.5))


@pytest.mark.parametrize("policy", ["block", "slice"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_recompiles_keep_their_sites(policy, side, caplog):
    """Models of several sizes in one process: from the second on, Dynamo compiles them with
    dynamic shapes, and in_features, pinned by the static weight, still counts as static."""
    with caplog.at_level(logging.WARNING, logger="slicecompile"):
        for k, n in [(32, 48), (64, 16), (96, 80)]:
            counters["slicecompile"].clear()
            compiled = torch.compile(_layer(side, k, n), backend="slicecompile", options=OPTIONS | {"policy": policy})
            compiled(torch.randn(40, k, requires_grad=True)).sum().backward()
            assert counters["slicecompile"]["rewritten"] == counters["slicecompile"]["sites"] == 1, (k, n)
    assert "rewritten by an earlier compile" not in caplog.text


class Recompiled(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(self.drop(x))


def test_a_recompile_that_loses_a_site_warns(caplog):
    model, options = Recompiled(), OPTIONS | {"min_gemm_size": 64 * 32 * 32}
    compiled = torch.compile(model, backend="slicecompile", options=options)
    with caplog.at_level(logging.WARNING, logger="slicecompile"):
        compiled(torch.randn(64, 32))
        assert counters["slicecompile"]["rewritten"] == 1 and not caplog.text
        model.eval()
        compiled(torch.randn(64, 32))  # eval mode: skipped as asked, no warning
        assert not caplog.text
        model.train()
        compiled(torch.randn(8, 32))  # now below min_gemm_size: element dropout again
    assert "rewritten by an earlier compile, now skipped: GEMM too small" in caplog.text


def test_a_compile_after_a_reset_is_no_recompile(caplog):
    """torch._dynamo.reset() numbers frames from 0 again: a site of other code (here the same
    code, compiled afresh with other options) that is skipped does not warn."""
    options = OPTIONS | {"min_gemm_size": 64 * 32 * 32}
    with caplog.at_level(logging.WARNING, logger="slicecompile"):
        torch.compile(Recompiled(), backend="slicecompile", options=options)(torch.randn(64, 32))
        assert counters["slicecompile"]["rewritten"] == 1
        torch._dynamo.reset()
        torch.compile(Recompiled(), backend="slicecompile", options=options)(torch.randn(8, 32))
        assert counters["slicecompile"]["skipped"] == 1
    assert not caplog.text
