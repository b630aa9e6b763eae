"""rewrite="auto": each site the pass can take is timed (ours against the dense computation
Inductor runs) and rewritten only where ours is faster by verdicts.MARGIN. On the CPU the timings
are injected (a GPU's verdicts are timed for real in the GPU test at the end); the workloads each
kind of site is timed on are checked against the site, and run once through the interpreter."""

import logging
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import slicecompile
from slicecompile.compiler import verdicts
from slicecompile.compiler.cache_key import sources_key
from slicecompile.compiler.options import parse_options

from conftest import DEVICE

OPTIONS = {"min_gemm_size": 0, "block": (16, 16)}


class MLP(nn.Module):
    def __init__(self, width=32, out=48):
        super().__init__()
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(width, out)

    def forward(self, x):
        return self.fc(self.drop(x))


class Output(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.fc = nn.Dropout(0.25), nn.Linear(32, 48, bias=False)

    def forward(self, x):
        return self.drop(self.fc(x))


class TwoLayers(nn.Module):
    """One dropout feeding two linear layers: one site, two GEMMs, one workload."""

    def __init__(self):
        super().__init__()
        self.drop, self.left, self.right = nn.Dropout(0.5), nn.Linear(32, 16), nn.Linear(32, 24, bias=False)

    def forward(self, x):
        d = self.drop(x)
        return self.left(d).sum(-1) + self.right(d).sum(-1)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.conv = nn.Dropout(0.5), nn.Conv2d(16, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(self.drop(x))


class Attention(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=self.causal)


class EagerAttention(nn.Module):
    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) / 4 + torch.triu(torch.full((q.shape[-2],) * 2, -1e9), 1)
        return F.dropout(scores.softmax(-1), 0.25) @ v


@pytest.fixture
def timed(monkeypatch):
    """Sites are timed, by a timer returning `times` and recording each workload."""
    monkeypatch.setattr(verdicts, "TIMED_DEVICES", frozenset({DEVICE}))
    asked = []

    def measure(work):
        asked.append(work)
        return timed.times

    timed.times, timed.asked = (1.0, 2.0), asked
    monkeypatch.setattr(verdicts, "measure", measure)
    return timed


def only_site(model, *args, **options):
    (site,) = slicecompile.explain(model, *args, options={**OPTIONS, **options}).sites
    return site


def test_faster_sites_are_rewritten_with_their_timing(timed):
    site = only_site(MLP(), torch.randn(4, 8, 32))
    assert site.rewritten and site.timing == (1.0, 2.0)
    assert timed.asked == [verdicts.Workload("linear", ((32, 32, 48, True),), "float32", 0.5, ((16, 16),))]


def test_slower_sites_are_left_to_inductor_and_compile_as_they_were(timed, caplog):
    timed.times = (0.96, 1.0)  # within MARGIN: no faster than Inductor
    site = only_site(MLP(), torch.randn(4, 8, 32))
    assert not site.rewritten and site.reason.startswith(verdicts.SLOWER) and site.requested
    assert "0.96 ms against 1 ms" in site.reason
    assert "0.96/1" in str(slicecompile.explain(MLP(), torch.randn(4, 8, 32), options=OPTIONS))
    with caplog.at_level(logging.INFO, logger="slicecompile"):
        torch.compile(MLP(), backend="slicecompile", options=OPTIONS)(torch.randn(4, 8, 32))
    assert dict(counters["slicecompile"]) == {"graphs": 1, "sites": 1, "skipped": 1}  # nothing rewritten
    assert any(verdicts.SLOWER in record.getMessage() for record in caplog.records)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_always_rewrites_without_timing(timed):
    site = only_site(MLP(), torch.randn(4, 8, 32), rewrite="always")
    assert site.rewritten and site.timing is None and not timed.asked


def test_a_failed_timing_leaves_the_site_with_a_warning(timed, monkeypatch, caplog):
    def fail(work):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(verdicts, "measure", fail)
    with caplog.at_level(logging.WARNING, logger="slicecompile"):
        site = only_site(MLP(), torch.randn(4, 8, 32))
    assert not site.rewritten and site.reason == f"{verdicts.UNTIMED}: RuntimeError: out of memory"
    assert any("timing dropout" in record.getMessage() for record in caplog.records)


def test_untimed_devices_rewrite_as_always(monkeypatch):
    monkeypatch.setattr(verdicts, "measure", lambda work: pytest.fail("timed a site"))
    site = only_site(MLP(), torch.randn(4, 8, 32))  # the conftest leaves TIMED_DEVICES empty
    assert site.rewritten and site.timing is None


def test_dropkey_attention_is_rewritten_untimed(timed):
    """attention="dropkey" is the user's choice of regulariser: never traded for Inductor's element
    dropout by a timing (leaving it would train a different model, differently on each GPU)."""
    timed.times = (2.0, 1.0)  # would be left to Inductor if timed
    q, k, v = torch.randn(2, 2, 24, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 8)
    site = only_site(Attention(), q, k, v, attention="dropkey")
    assert site.rewritten and site.timing is None and not timed.asked
    assert not only_site(Attention(), q, k, v).rewritten, "the default policy is timed"


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown rewrite mode 'sometimes'; known modes: auto, always"):
        parse_options({"rewrite": "sometimes"})


# Each kind of site, its workload, and its inputs.
WORKLOADS = {
    "input, two layers": (
        TwoLayers, [(4, 8, 32)], {},
        verdicts.Workload("linear", ((32, 32, 16, True), (32, 32, 24, False)), "float32", 0.5, ((16, 16),)),
    ),
    "slice": (
        MLP, [(4, 8, 32)], {"policy": "slice"},
        verdicts.Workload("slice", ((32, 32, 48, True),), "float32", 0.5, ((16, 16),)),
    ),
    "output": (
        Output, [(4, 8, 32)], {},
        verdicts.Workload("output", ((32, 32, 48, False),), "float32", 0.25, ((16, 16),)),
    ),
    "conv": (
        Conv, [(2, 16, 6, 6)], {},
        verdicts.Workload(
            "conv", ((2, 16, 6, 6), (8, 16, 3, 3), True), "float32", 0.5, ("block", 8, (2, 2), (1, 1), (1, 1))
        ),
    ),
    "sdpa": (
        lambda: Attention(causal=True), [(2, 2, 24, 16), (2, 2, 40, 16), (2, 2, 40, 8)], {},
        verdicts.Workload("attention", (4, 24, 40, 16, 8, False), "float32", 0.25, ((16, 16), True)),
    ),
    "eager attention": (
        EagerAttention, [(2, 24, 16), (2, 24, 16), (2, 24, 8)], {},
        verdicts.Workload("attention", (2, 24, 24, 16, 8, True), "float32", 0.25, ((16, 16), False)),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", WORKLOADS.values(), ids=WORKLOADS.keys())
def test_each_kind_of_site_is_timed_on_its_workload(timed, case):
    make, shapes, options, expected = case
    site = only_site(make(), *(torch.randn(shape) for shape in shapes), **options)
    assert site.rewritten and timed.asked == [expected]


@pytest.mark.parametrize("case", WORKLOADS.values(), ids=WORKLOADS.keys())
def test_each_workload_runs_ours_and_the_dense_computation(case):
    """Forward and backward of both sides: on the CPU once each (through the interpreter), on a
    GPU timed."""
    *_, work = case
    ours, dense = verdicts.time_workload(work, device=DEVICE)
    assert (ours, dense) == (1.0, 1.0) if DEVICE == "cpu" else ours > 0 and dense > 0


def test_timings_are_cached_on_disk_per_gpu_and_versions(monkeypatch, tmp_path):
    monkeypatch.setenv("SLICECOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(verdicts, "_MEASURED", {})
    timings = iter([(1.0, 2.0), (3.0, 4.0)])
    monkeypatch.setattr(verdicts, "time_workload", lambda work: next(timings))
    first, second = (verdicts.Workload("linear", ((m, 64, 64, True),), "bfloat16", 0.5, ((64, 64),)) for m in (64, 128))
    assert verdicts.measure(first) == (1.0, 2.0) and verdicts.measure(first) == (1.0, 2.0)
    monkeypatch.setattr(verdicts, "_MEASURED", {})  # a new process
    assert verdicts.measure(first) == (1.0, 2.0) and verdicts.measure(second) == (3.0, 4.0)
    (name,) = os.listdir(tmp_path)
    assert torch.__version__.replace("+", "") in name.replace("+", "") and "triton" in name
    assert name.endswith(sources_key()), "an edit to the package's sources starts a new file"


def test_compiled_host_time_counts_our_kernels_and_what_inductor_fuses():
    """Our kernels at OUR_LAUNCH_MS each; the eager op's many small torch kernels as at most
    FUSED_LAUNCHES of Inductor's; the dense side's kernels each as one of Inductor's."""
    ours = ["sparse_input_matmul_kernel", "sparse_output_matmul_kernel", "sparse_input_matmul_kernel"]
    torch_side = ["void at::native::vectorized_elementwise_kernel<...>"] * 30
    expected = 3 * verdicts.OUR_LAUNCH_MS + verdicts.FUSED_LAUNCHES * verdicts.INDUCTOR_LAUNCH_MS
    assert verdicts.host_ms(ours + torch_side, ours=True) == pytest.approx(expected)
    assert verdicts.host_ms(ours + torch_side[:2], ours=True) == pytest.approx(
        3 * verdicts.OUR_LAUNCH_MS + 2 * verdicts.INDUCTOR_LAUNCH_MS
    )
    gemms = ["sm90_xmma_gemm_bf16bf16_bf16f32"] * 3
    assert verdicts.host_ms(gemms, ours=False) == pytest.approx(3 * verdicts.INDUCTOR_LAUNCH_MS)


@pytest.mark.gpu
def test_a_large_site_on_the_gpu_is_timed(monkeypatch, tmp_path):
    """The real timer: a (4096, 4096) -> 4096 bfloat16 site at p = 0.5 gets both timings, and the
    verdict follows them."""
    monkeypatch.setattr(verdicts, "TIMED_DEVICES", frozenset({"cuda"}))
    monkeypatch.setenv("SLICECOMPILE_CACHE_DIR", str(tmp_path))
    site = only_site(MLP(4096, 4096).to(torch.bfloat16), torch.randn(2, 2048, 4096, dtype=torch.bfloat16))
    ours, inductor = site.timing
    assert ours > 0 and inductor > 0
    assert site.rewritten == (ours <= verdicts.MARGIN * inductor)
