"""The size gate: a site is too small when the roofline estimate of its forward+backward GEMMs at
an H100's peaks (FLOPs or bytes, whichever bounds it) is under the per-site overhead; LoRA's skinny
adapters at realistic sizes pass it, toy sites do not, and an explicit min_gemm_size keeps the
older M·K·N rule."""

import pytest
import torch
import torch.nn as nn

from slicecompile.compiler.explain import explain
from slicecompile.compiler.options import Options, parse_options
from slicecompile.compiler.size_gate import BYTES_PER_S, PEAK_FLOPS, SITE_OVERHEAD_US, site_us, size_reason

RANK = 16
# Llama-style widths and their MLPs (Llama 3.2 1B / 3B-class and Llama 2 7B)
WIDTHS = [(2048, 5632), (4096, 11008)]
TOKENS = [4 * 512, 4 * 2048]


@pytest.mark.parametrize("hidden, mlp", WIDTHS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_adapters_at_realistic_sizes_pass_the_default_gate(hidden, mlp, tokens, dtype):
    # lora_A of q, k, v, o, gate and up reads the hidden state; down's reads the MLP's activation
    for features in (hidden, mlp):
        assert size_reason([(tokens, features, RANK)], Options(), dtype) is None


@pytest.mark.parametrize("gemm", [(48, 32, 24), (40, 64, 8), (40, 128, 8), (2 * 20, 64, 64), (256, 256, 16)])
def test_toy_sites_stay_too_small(gemm):
    reason = size_reason([gemm], Options(), torch.float32)
    assert reason.startswith("GEMM too small: ") and reason.endswith(f"< {SITE_OVERHEAD_US:g} µs")


def test_the_estimate_is_the_roofline_of_three_gemms():
    m, k, n = 8192, 4096, RANK  # skinny: the bytes of x bound it
    us, bound = site_us([(m, k, n)], torch.bfloat16)
    assert bound == "bytes" and us == pytest.approx(3 * 2 * (m * k + k * n + m * n) / BYTES_PER_S * 1e6)
    m = k = n = 4096  # square: the FLOPs bound it
    us, bound = site_us([(m, k, n)], torch.bfloat16)
    assert bound == "FLOP" and us == pytest.approx(3 * 2 * m * k * n / PEAK_FLOPS[torch.bfloat16] * 1e6)
    assert site_us([(m, k, n)] * 2, torch.bfloat16)[0] == pytest.approx(2 * us)  # a site's matmuls add up


def test_a_skinny_gemm_weighs_more_than_a_square_one_of_the_same_m_k_n():
    """What min_gemm_size got wrong: both are 2**24 multiply-adds, but the skinny one reads 12x the bytes."""
    skinny, square = (4096, 512, 8), (256, 256, 256)
    assert size_reason([skinny], Options(), torch.bfloat16) is None
    assert size_reason([square], Options(), torch.bfloat16).startswith("GEMM too small")
    old = Options(min_gemm_size=2**24)
    assert size_reason([skinny], old) is None and size_reason([square], old) is None


def test_an_explicit_min_gemm_size_keeps_the_m_k_n_rule():
    lora = [(4 * 512, 2048, RANK)]
    reason = size_reason(lora, Options(min_gemm_size=2**27))
    assert reason == "GEMM too small (M*K*N = 67108864 < min_gemm_size = 134217728)"
    assert size_reason([(1, 1, 1)], Options(min_gemm_size=0)) is None
    assert parse_options({"min_gemm_size": 0})[0].min_gemm_size == 0
    assert parse_options({})[0].min_gemm_size is None  # the gate by work
    assert parse_options({"min_gemm_size": None})[0].min_gemm_size is None
    with pytest.raises(ValueError, match="min_gemm_size must be an int >= 0"):
        parse_options({"min_gemm_size": 1.5})


class Adapter(nn.Module):
    """torchtune's lora_b(lora_a(dropout(x))), without the frozen layer beside it."""

    def __init__(self, features):
        super().__init__()
        self.dropout = nn.Dropout(0.1)
        self.lora_a, self.lora_b = nn.Linear(features, RANK, bias=False), nn.Linear(RANK, features, bias=False)

    def forward(self, x):
        return self.lora_b(self.lora_a(self.dropout(x)))


@pytest.mark.parametrize(
    "shape, rewritten",
    [((4, 512, 2048), True), ((2, 20, 64), False)],  # issue 28's smallest CPU target; test_lora.py's toy Llama
)
def test_explain_under_default_options(shape, rewritten):
    (site,) = explain(Adapter(shape[-1]).to(torch.bfloat16), torch.randn(shape, dtype=torch.bfloat16)).sites
    assert site.gemms == ((shape[0] * shape[1], shape[-1], RANK),)
    assert site.rewritten == rewritten, site.reason
