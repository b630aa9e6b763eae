"""Block-sparse A times dense B into dense C (the "DSD" primitive).

C[M, N] = scale * (A ⊙ mask)[M, K] @ B[K, N] (+ bias[N]), where the mask is made of
(MASK_BM, MASK_BK) tiles and block-row i keeps the tiles listed in kept[i, :count[i]].
Each program loops over its block-row's kept K-tiles only, so dropped tiles are never
loaded or multiplied, and the loop body has no branch.

Roles: the input-side dropout forward (A = X, B = Wᵀ) and its weight gradient
(A = Xᵀ with the mask's column lists, B = dY, C = dWᵀ).
"""

import torch
import triton
import triton.language as tl

from .runtime import check_matmul_operands, interpreting, run_in_interpreter_dtype, traceable
from .tiling import grouped_tile


@triton.jit
def sparse_input_matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    kept_ptr,
    count_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_kept_m,
    stride_kept_k,
    stride_count,
    scale,
    MASK_BM: tl.constexpr,
    MASK_BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """a: (M, K), b: (K, N), c: (M, N), bias: (N,) if HAS_BIAS,
    kept: (cdiv(M, MASK_BM), width) int32 K-tile indices, count: per block-row int32.
    BLOCK_M divides MASK_BM and BLOCK_K divides MASK_BK, so the tiles the kernel uses
    never change which elements are dropped."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    in_m = offs_m[:, None] < M
    in_n = offs_n[None, :] < N

    block_row = (pid_m * BLOCK_M) // MASK_BM
    kept_row = kept_ptr + block_row * stride_kept_m
    SUB_K: tl.constexpr = MASK_BK // BLOCK_K
    steps = tl.load(count_ptr + block_row * stride_count) * SUB_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, steps):
        tile = tl.load(kept_row + (step // SUB_K) * stride_kept_k)
        k = tile * MASK_BK + (step % SUB_K) * BLOCK_K + offs_k
        in_k = k < K
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=in_m & in_k[None, :], other=0.0)
        b = tl.load(b_cols + k[:, None] * stride_bk, mask=in_k[:, None] & in_n, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    acc = acc * scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=in_m & in_n)


def _config(mask_block, interpret, a_column_major):
    """Kernel tiles never exceed the mask's tiles (which must stay independent of them)."""
    mask_bm, mask_bk = mask_block
    if interpret:  # the interpreter pays per program and per loop step: the biggest tiles
        return dict(BLOCK_M=mask_bm, BLOCK_N=64, BLOCK_K=mask_bk, GROUP_M=1, num_warps=4, num_stages=1)
    # H200, bf16, (8192, 4096, 4096), p = 0.5, block 128: row-major A (the forward) is fastest
    # with 8 warps and 3 stages (0.310 ms), column-major A (the weight gradient) with 4 warps
    # and 4 stages (0.258 ms, against 0.28+ with 8 warps): bench/sweep_kernel_configs.py,
    # bench/results/logs/sweep_kernel_configs.log.
    warps, stages = (4, 4) if a_column_major else (8, 3)
    return dict(
        BLOCK_M=min(128, mask_bm),
        BLOCK_N=128,
        BLOCK_K=min(64, mask_bk),
        GROUP_M=8,
        num_warps=warps,
        num_stages=stages,
    )


def sparse_input_matmul(a, b, kept, count, mask_block, scale, bias=None, out=None, allow_tf32=False, config=None):
    """scale * (a ⊙ mask) @ b (+ bias) -> (M, N), for 2-D a (M, K) and b (K, N) of any strides.

    kept: (cdiv(M, mask_block[0]), width) int32, block-row i keeps K-tiles kept[i, :count[i]];
    count: int32 with one entry per block-row, or a single entry shared by all rows.
    config: kernel tiles and launch options overriding the default (tiles must divide the mask's block).
    out: optional (M, N) tensor (any strides) to write into.
    """
    check_matmul_operands(a, b)
    M, K = a.shape
    N = b.shape[1]
    n_block_rows = triton.cdiv(M, mask_block[0])
    if kept.dtype != torch.int32 or count.dtype != torch.int32:
        raise TypeError(f"kept and count must be int32, got {kept.dtype} and {count.dtype}")
    if kept.dim() != 2 or kept.shape[0] != n_block_rows:
        raise ValueError(f"kept must have shape ({n_block_rows}, width), got {tuple(kept.shape)}")
    if count.numel() not in (1, n_block_rows):
        raise ValueError(f"count must have 1 or {n_block_rows} entries, got {count.numel()}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    elif out.shape != (M, N):
        raise ValueError(f"out must have shape ({M}, {N}), got {tuple(out.shape)}")

    with run_in_interpreter_dtype(out, a, b, bias) as (out_, a, b, bias):
        config = config or _config(mask_block, interpreting(), a.stride(0) == 1 and a.stride(1) != 1)
        if mask_block[0] % config["BLOCK_M"] or mask_block[1] % config["BLOCK_K"]:
            raise ValueError(f"kernel tiles {config} must divide the mask's block {mask_block}")
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        traceable(sparse_input_matmul_kernel)[grid](
            a,
            b,
            out_,
            bias,
            kept,
            count,
            M,
            N,
            K,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            out_.stride(0),
            out_.stride(1),
            kept.stride(0),
            kept.stride(1),
            0 if count.numel() == 1 else count.stride(0),
            float(scale),
            MASK_BM=mask_block[0],
            MASK_BK=mask_block[1],
            HAS_BIAS=bias is not None,
            INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
            **config,
        )
    return out
