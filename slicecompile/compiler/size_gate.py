"""Which sites are too small for a rewrite to pay, judged by the work their GEMMs do.

A site's forward and backward run three GEMMs per matmul (Y = XWᵀ, dX = dY W, dW = dYᵀX), each
doing 2·M·K·N FLOPs and moving its three matrices, (M·K + K·N + M·N) elements. Each GEMM takes at
least max(FLOPs / peak FLOP rate, bytes / memory bandwidth) — the roofline — so a skinny GEMM
(LoRA's lora_A: N = r = 8-64) is judged by the bytes of x it reads, not by its few FLOPs, and a
square one by its FLOPs. A site whose estimate falls below SITE_OVERHEAD_US, about one kernel
launch, is left alone: nothing done to it would show.

The figures are an H100's (SXM5, NVIDIA's datasheet, dense), whatever the device compiling, so
that a CPU run makes the decisions a GPU run would. They are peaks, so the estimate is a lower
bound of the site's time, and the gate errs towards rewriting; on a GPU, rewrite="auto" then
times every site that passes (verdicts.py).

options.min_gemm_size, when a user passes one, replaces this rule with the older one: M·K·N summed
over the site's matmuls against that number (0 lets every size through).
"""

import torch

# bf16/fp16 tensor cores 989 TFLOP/s; fp32 67 TFLOP/s (torch's default runs fp32 matmuls without
# TF32); HBM3 3.35 TB/s.
PEAK_FLOPS = {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}
BYTES_PER_S = 3.35e12
GEMMS_PER_MATMUL = 3  # forward, dX, dW
# About what one kernel launch occupies an H100 for, however little the kernel does (~1 µs; an
# order of magnitude, not measured here). A site whose three GEMMs take less is launch-bound
# whatever is done to it, and the activation memory a rewrite could save there is at most about
# 1 µs × 3.35 TB/s / 3 ≈ 1 MB. It screens out only that: whether a rewrite pays in time is
# rewrite="auto"'s verdict on a GPU. The smallest LoRA site the gate must pass (hidden 2048, r 16,
# 4 × 512 tokens, bf16) is 7.6 µs; the tests' toy sites (hidden 32-64, a few dozen rows) are
# under 0.05 µs.
SITE_OVERHEAD_US = 1.0


def gemm_us(gemm, dtype=None):
    """(FLOP-bound µs, byte-bound µs) of one GEMM of (M, K, N) in dtype at the H100's peaks."""
    m, k, n = gemm
    dtype = dtype if dtype in PEAK_FLOPS else torch.bfloat16
    flops, elements = 2 * m * k * n, m * k + k * n + m * n
    return flops / PEAK_FLOPS[dtype] * 1e6, elements * dtype.itemsize / BYTES_PER_S * 1e6


def site_us(gemms, dtype=None):
    """(µs, "FLOP" or "bytes"): the roofline estimate of a site's forward+backward over its GEMMs
    (M, K, N), and which bound dominates it."""
    times = [gemm_us(gemm, dtype) for gemm in gemms]
    total = GEMMS_PER_MATMUL * sum(max(flop_us, byte_us) for flop_us, byte_us in times)
    byte_bound = sum(byte_us for _, byte_us in times) >= sum(flop_us for flop_us, _ in times)
    return total, "bytes" if byte_bound else "FLOP"


def size_reason(gemms, options, dtype=None):
    """Why GEMMs of these (M, K, N), computing in dtype, are too small for a site, or None: by
    the roofline estimate (module docstring), or by options.min_gemm_size when one is given."""
    if options.min_gemm_size is not None:
        size = sum(m * k * n for m, k, n in gemms)
        if size < options.min_gemm_size:
            return f"GEMM too small (M*K*N = {size} < min_gemm_size = {options.min_gemm_size})"
        return None
    us, bound = site_us(gemms, dtype)
    if us < SITE_OVERHEAD_US:
        return (
            f"GEMM too small: {us:.2g} µs forward+backward at an H100's peaks ({bound}-bound) < {SITE_OVERHEAD_US:g} µs"
        )
    return None
