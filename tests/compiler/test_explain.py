"""slicecompile.explain: every dropout site with where it is, what consumes it, shapes, p and
the decision, plus the predicted FLOP saving; detection only (nothing is compiled)."""

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from slicecompile.compiler.explain import Report, explain

from conftest import DEVICE
from models_by_others import EXPECTED, example_input

ALWAYS = {"min_gemm_size": 0, "block": 16}


class HeadAfterBreak(nn.Module):
    """Two dropout sites split by a graph break: one rewritable, one feeding an add."""

    def __init__(self):
        super().__init__()
        self.drop, self.fc = nn.Dropout(0.25), nn.Linear(32, 16)

    def forward(self, x):
        hidden = self.fc(self.drop(x))
        torch._dynamo.graph_break()
        return hidden + self.drop(hidden)


def test_sites_carry_location_consumer_shapes_and_decision():
    report = explain(HeadAfterBreak(), torch.randn(4, 8, 32), options=ALWAYS)
    assert report.graphs == 2
    rewritten, skipped = report.sites
    assert (rewritten.module, rewritten.consumer, rewritten.pattern) == ("drop", "linear", "dropout_linear")
    assert rewritten.location == f"test_explain.py:{HeadAfterBreak.forward.__code__.co_firstlineno + 1}"
    assert (rewritten.input_shape, rewritten.gemms, rewritten.p) == ((4, 8, 32), ((32, 32, 16),), 0.25)
    assert (rewritten.dtype, rewritten.device, rewritten.rewritten, rewritten.reason) == (
        "float32",
        DEVICE,
        True,
        "rewritten",
    )
    assert (skipped.module, skipped.consumer, skipped.rewritten) == ("drop", "add", False)
    assert skipped.reason == "used by add (not a matmul input)" and skipped.gemms == ()


def test_predicted_saving_is_p_of_three_gemms():
    report = explain(HeadAfterBreak(), torch.randn(4, 8, 32), options=ALWAYS)
    dense = 6 * 32 * 32 * 16  # forward, dX and dW GEMMs of the one matmul fed by a dropout
    assert report.dense_flops == dense and report.saved_flops == dense // 4


def test_options_change_the_decision():
    (site, _) = explain(HeadAfterBreak(), torch.randn(4, 8, 32)).sites
    assert not site.rewritten and site.reason.startswith("GEMM too small")
    (site, _) = explain(HeadAfterBreak(), torch.randn(4, 8, 32), options={**ALWAYS, "enabled": False}).sites
    assert site.reason == "disabled by options"
    with pytest.raises(ValueError, match="unknown slicecompile option"):
        explain(HeadAfterBreak(), torch.randn(4, 8, 32), options={"bloc": 16})


def test_table():
    report = explain(HeadAfterBreak(), torch.randn(4, 8, 32), options=ALWAYS)
    lines = str(report).splitlines()
    header = ["site", "consumer", "input", "shape", "GEMMs", "(M,K,N)", "p", "side", "policy", "ms", "ours/Inductor"]
    assert lines[0].split() == header + ["rewritten", "reason"]
    assert lines[2].split()[:2] == ["drop", f"(test_explain.py:{HeadAfterBreak.forward.__code__.co_firstlineno + 1})"]
    assert lines[2].split()[2:10] == ["linear", "4x8x32", "32x32x16", "0.25", "input", "block", "-", "yes"]
    assert "used by add (not a matmul input)" in lines[3]
    assert lines[-1] == (
        "1 of 2 sites rewritten in 2 graph(s); predicted GEMM FLOPs saved per step (fwd+bwd): "
        "2.46e+04 of 9.83e+04 (25%)"
    )
    assert str(Report()).splitlines()[-1].startswith("0 of 0 sites")


class LinearAndAttention(nn.Module):
    """A dropout before a linear layer and one of attention probabilities."""

    def __init__(self):
        super().__init__()
        self.drop, self.fc = nn.Dropout(0.25), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc(self.drop(x)), torch.bmm(self.drop((x @ x.transpose(1, 2)).softmax(-1)), x)


def test_policy_per_site():
    """Under policy="slice", linear layers take windows; attention keeps block tiles."""
    block = explain(LinearAndAttention(), torch.randn(4, 8, 32), options=ALWAYS)
    assert [(s.pattern, s.policy, s.rewritten) for s in block.sites] == [
        ("dropout_linear", "block", True),
        ("attention_dropout", "block", True),
    ]
    sliced = explain(LinearAndAttention(), torch.randn(4, 8, 32), options={**ALWAYS, "policy": "slice"})
    assert [(s.pattern, s.policy, s.rewritten) for s in sliced.sites] == [
        ("dropout_linear", "slice", True),
        ("attention_dropout", "block", True),
    ]
    assert str(sliced).splitlines()[2].split()[5:8] == ["0.25", "input", "slice"]


@pytest.mark.parametrize("name", EXPECTED)
def test_models_written_by_others(name):
    make, expected = EXPECTED[name]
    report = explain(make(), example_input(), options=ALWAYS)
    assert [(site.module, site.reason) for site in report.sites] == expected


def test_explain_compiles_nothing_and_counts_nothing():
    counters["slicecompile"].clear()
    counters["inductor"].clear()
    explain(HeadAfterBreak(), torch.randn(4, 8, 32), options=ALWAYS)
    assert not counters["slicecompile"] and not counters["inductor"]


class ResidualProjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.proj = nn.Dropout(0.25), nn.Linear(32, 24)

    def forward(self, x):
        return x[..., :24] + self.drop(self.proj(x))


@pytest.mark.parametrize("policy", ["block", "slice"])
def test_output_side_site(policy):
    """projection → dropout → add: an output-side site, in block tiles under either policy."""
    report = explain(ResidualProjection(), torch.randn(4, 8, 32), options={**ALWAYS, "policy": policy})
    (site,) = report.sites
    assert (site.consumer, site.pattern, site.side, site.policy) == ("linear", "linear_dropout", "output", "block")
    assert (site.input_shape, site.gemms, site.rewritten) == ((4, 8, 24), ((32, 32, 24),), True)
    assert report.saved_flops == 6 * 32 * 32 * 24 // 4
    row = str(report).splitlines()[2].split()
    assert row[2:10] == ["linear", "4x8x24", "32x32x24", "0.25", "output", "block", "-", "yes"]
    (off,) = explain(ResidualProjection(), torch.randn(4, 8, 32), options={**ALWAYS, "output_side": False}).sites
    assert (off.rewritten, off.reason) == (False, "output side turned off (output_side=False)")
