"""Block-sparse A times dense B into dense C (the "DSD" primitive).

C[M, N] = scale * (A ⊙ mask)[M, K] @ B[K, N] (+ bias[N]), where the mask is made of
(MASK_BM, MASK_BK) tiles and block-row i keeps the tiles listed in kept[i, :count[i]].
Each program loops over its block-row's kept K-tiles only, so dropped tiles are never
loaded or multiplied, and the loop body has no branch.

Roles: the input-side dropout forward (A = X, B = Wᵀ) and its weight gradient
(A = Xᵀ with the mask's column lists, B = dY, C = dWᵀ); the output-side dropout's input
gradient (A = dY, B = W, C = dX) and weight gradient (A = dYᵀ with the mask's column lists,
B = X, C = dW).

Two kernels compute it: one reads its operands through the tensor memory accelerator (Hopper
and newer, 16-bit operands with 16-byte aligned rows), the other through pointers (any GPU).
"""

import torch
import triton
import triton.language as tl

from .runtime import (
    autotuned,
    check_matmul_operands,
    fit_to_mask,
    interpreting,
    kernel_operands,
    launch_config,
    run_in_interpreter_dtype,
    size_key,
)
from .tiling import block_descriptor, grouped_tile, load_block


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
    M_KEY,
    N_KEY,
    K_KEY,
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
    A_T: tl.constexpr,
    B_T: tl.constexpr,
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
    never change which elements are dropped. *_KEY (sizes rounded up to powers of two),
    A_T and B_T (unit stride along M, along K) only key the autotuning."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BK % BLOCK_K == 0, "tiles must divide the mask's block")
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

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

    _store_output(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, scale, HAS_BIAS)


@triton.jit
def sparse_input_matmul_tma_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    kept_ptr,
    count_ptr,
    M,
    N,
    K,
    M_KEY,
    N_KEY,
    K_KEY,
    stride_a,
    stride_b,
    stride_cm,
    stride_cn,
    stride_kept_m,
    stride_kept_k,
    stride_count,
    scale,
    A_T: tl.constexpr,
    B_T: tl.constexpr,
    MASK_BM: tl.constexpr,
    MASK_BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """sparse_input_matmul_kernel with a and b read by the tensor memory accelerator: a has
    unit stride along K, or along M if A_T, and stride_a is its other stride; b has unit
    stride along N, or along K if B_T. Persistent: programs stride over the output tiles,
    so one tile's epilogue overlaps the next one's loads. PERSISTENT only tells the launcher to size the
    grid at one program per multiprocessor rather than one per tile."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BK % BLOCK_K == 0, "tiles must divide the mask's block")
    a_desc = block_descriptor(a_ptr, M, K, stride_a, BLOCK_M, BLOCK_K, A_T)
    b_desc = block_descriptor(b_ptr, K, N, stride_b, BLOCK_K, BLOCK_N, B_T)
    SUB_K: tl.constexpr = MASK_BK // BLOCK_K
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        block_row = (pid_m * BLOCK_M) // MASK_BM
        kept_row = kept_ptr + block_row * stride_kept_m
        steps = tl.load(count_ptr + block_row * stride_count) * SUB_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, steps):
            tile = tl.load(kept_row + (step // SUB_K) * stride_kept_k)
            k = tile * MASK_BK + (step % SUB_K) * BLOCK_K
            a = load_block(a_desc, pid_m * BLOCK_M, k, A_T)
            b = load_block(b_desc, k, pid_n * BLOCK_N, B_T)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _store_output(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, scale, HAS_BIAS)


@triton.jit
def _store_output(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, scale, HAS_BIAS: tl.constexpr):
    acc = acc * scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _configs(tma):
    """Autotuning candidates (tiles shrink to fit smaller mask blocks: fit_to_mask). On an H200
    at bf16 (8192, 4096) -> 4096, p = 0.5, the forward was fastest with the persistent TMA kernel
    at 128x256x64, 8 warps, 5 stages (0.251 ms against 0.323 for the pointer kernel), the weight
    gradient with the TMA kernel at 128x128x64, 4 warps, 5 stages, one program per tile (0.247
    against 0.277): bench/sweep_kernel_configs.py, bench/results/kernel_configs.csv. Triton's
    warp specialisation ran the forward in 0.239 ms but gave wrong results on small shapes
    (Triton 3.6), so it is not a candidate."""
    if not tma:
        return [
            triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
            for bk, w, s in [(64, 8, 3), (64, 4, 4), (128, 8, 3)]
        ]
    return [
        triton.Config(
            dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, PERSISTENT=persistent), num_warps=w, num_stages=s
        )
        for bn, w, s, persistent in [(256, 8, 5, True), (128, 4, 5, False), (128, 4, 5, True), (128, 8, 5, True)]
    ]


def _fit(configs, named_args, **kwargs):
    return fit_to_mask(configs, named_args, BLOCK_M=kwargs["MASK_BM"], BLOCK_K=kwargs["MASK_BK"])


_KEY = ["M_KEY", "N_KEY", "K_KEY", "A_T", "B_T", "MASK_BM", "MASK_BK"]
_tuned = autotuned(sparse_input_matmul_kernel, _configs(tma=False), _KEY, _fit)
_tuned_tma = autotuned(sparse_input_matmul_tma_kernel, _configs(tma=True), _KEY, _fit)


def _interpreter_config(mask_block):
    """The interpreter pays per program and per loop step: the biggest tiles."""
    return dict(BLOCK_M=mask_block[0], BLOCK_N=64, BLOCK_K=mask_block[1], GROUP_M=1, num_warps=4, num_stages=1)


def sparse_input_matmul(
    a, b, kept, count, mask_block, scale, bias=None, out=None, allow_tf32=False, config=None, tma=None
):
    """scale * (a ⊙ mask) @ b (+ bias) -> (M, N), for 2-D a (M, K) and b (K, N) of any strides.

    kept: (cdiv(M, mask_block[0]), width) int32, block-row i keeps K-tiles kept[i, :count[i]];
    count: int32 with one entry per block-row, or a single entry shared by all rows.
    config: kernel tiles and launch options instead of autotuning (tiles must divide the mask's block).
    tma: read operands through the tensor memory accelerator; None picks it where it works.
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
        use_tma, a_t, b_t, strides = kernel_operands(a, b, tma, mask_block)
        kernel, tuned = (
            (sparse_input_matmul_tma_kernel, _tuned_tma) if use_tma else (sparse_input_matmul_kernel, _tuned)
        )
        config = config or (_interpreter_config(mask_block) if interpreting() else None)
        launch, grid, meta = launch_config(
            kernel, tuned, config, ("BLOCK_M", "BLOCK_K"), mask_block, M, N, persistent=use_tma, a=a
        )
        launch[grid](
            a,
            b,
            out_,
            bias,
            kept,
            count,
            M,
            N,
            K,
            size_key(M),
            size_key(N),
            size_key(K),
            *strides,
            out_.stride(0),
            out_.stride(1),
            kept.stride(0),
            kept.stride(1),
            0 if count.numel() == 1 else count.stride(0),
            float(scale),
            A_T=a_t,
            B_T=b_t,
            MASK_BM=mask_block[0],
            MASK_BK=mask_block[1],
            HAS_BIAS=bias is not None,
            INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
            **meta,
        )
    return out
