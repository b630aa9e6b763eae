"""Dense A times dense B into block-sparse C (the "SDD" primitive).

C[M, N] = scale * (A[M, K] @ B[K, N] (+ bias[N])) ⊙ mask, where the mask is made of
(MASK_BM, MASK_BN) tiles given densely as a (cdiv(M, MASK_BM), cdiv(N, MASK_BN)) 0/1 table.
Every output tile is written: kept tiles get the product, dropped tiles get zeros without
loading anything (their K loop runs zero times, so the kernel has no branch).

Roles: the input-side dropout's input gradient (A = dY, B = W, C = dX) and the output-side
dropout's forward (A = X, B = Wᵀ, with the bias, which a dropped tile drops too).

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
def sparse_output_matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    keep_ptr,
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
    stride_keep_m,
    stride_keep_n,
    scale,
    A_T: tl.constexpr,
    B_T: tl.constexpr,
    MASK_BM: tl.constexpr,
    MASK_BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """a: (M, K), b: (K, N), c: (M, N), bias: (N,) if HAS_BIAS,
    keep: (cdiv(M, MASK_BM), cdiv(N, MASK_BN)) uint8. BLOCK_M divides MASK_BM and BLOCK_N
    divides MASK_BN. *_KEY (sizes rounded up to powers of two), A_T and B_T (unit stride
    along M, along K) only key the autotuning."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BN % BLOCK_N == 0, "tiles must divide the mask's block")
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    in_m = offs_m[:, None] < M
    in_n = offs_n[None, :] < N

    keep = _keep(keep_ptr, pid_m, pid_n, stride_keep_m, stride_keep_n, MASK_BM, MASK_BN, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K) * keep):
        in_k = offs_k + k0 * BLOCK_K < K
        a = tl.load(a_ptrs, mask=in_m & in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None] & in_n, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    _store_output(acc, c_ptr, bias_ptr, keep, offs_m, offs_n, M, N, stride_cm, stride_cn, scale, HAS_BIAS)


@triton.jit
def sparse_output_matmul_tma_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    keep_ptr,
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
    stride_keep_m,
    stride_keep_n,
    scale,
    A_T: tl.constexpr,
    B_T: tl.constexpr,
    MASK_BM: tl.constexpr,
    MASK_BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """sparse_output_matmul_kernel with a and b read by the tensor memory accelerator: a has
    unit stride along K, or along M if A_T, and stride_a is its other stride; b has unit
    stride along N, or along K if B_T. Persistent: programs stride over the output tiles
    (dropped ones cost a store of zeros). PERSISTENT only tells the launcher to size the grid at one
    program per multiprocessor rather than one per tile."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BN % BLOCK_N == 0, "tiles must divide the mask's block")
    a_desc = block_descriptor(a_ptr, M, K, stride_a, BLOCK_M, BLOCK_K, A_T)
    b_desc = block_descriptor(b_ptr, K, N, stride_b, BLOCK_K, BLOCK_N, B_T)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        keep = _keep(keep_ptr, pid_m, pid_n, stride_keep_m, stride_keep_n, MASK_BM, MASK_BN, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K) * keep):
            a = load_block(a_desc, pid_m * BLOCK_M, k0 * BLOCK_K, A_T)
            b = load_block(b_desc, k0 * BLOCK_K, pid_n * BLOCK_N, B_T)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _store_output(acc, c_ptr, bias_ptr, keep, offs_m, offs_n, M, N, stride_cm, stride_cn, scale, HAS_BIAS)


@triton.jit
def _keep(keep_ptr, pid_m, pid_n, stride_keep_m, stride_keep_n, MASK_BM, MASK_BN, BLOCK_M, BLOCK_N):
    """1 if output tile (pid_m, pid_n) lies in a kept mask tile, else 0 (the K loop's trip factor)."""
    keep_m = (pid_m * BLOCK_M) // MASK_BM
    keep_n = (pid_n * BLOCK_N) // MASK_BN
    return tl.load(keep_ptr + keep_m * stride_keep_m + keep_n * stride_keep_n).to(tl.int32)


@triton.jit
def _store_output(
    acc, c_ptr, bias_ptr, keep, offs_m, offs_n, M, N, stride_cm, stride_cn, scale, HAS_BIAS: tl.constexpr
):
    if HAS_BIAS:  # a dropped tile (keep = 0) drops its bias too
        bias = tl.load(bias_ptr + offs_n, mask=(offs_n < N) & (keep != 0), other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c, (acc * scale).to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _configs(tma):
    """Autotuning candidates (tiles shrink to fit smaller mask blocks: fit_to_mask). On an H200
    at bf16 (8192, 4096) -> 4096, p = 0.5, the input gradient was fastest with the persistent
    TMA kernel at 128x128x64, 4 warps, 5 stages (0.240 ms; 0.258 not persistent; 0.295 for the
    pointer kernel): bench/sweep_kernel_configs.py, bench/results/kernel_configs.csv. A
    persistent grid splits the tiles evenly but not the kept ones, so with long K loops the
    hardware's own scheduling of one program per tile can win: both are candidates."""
    if not tma:
        return [
            triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
            for bk, w, s in [(64, 4, 4), (128, 8, 3), (64, 8, 3)]
        ]
    return [
        triton.Config(
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=persistent), num_warps=w, num_stages=s
        )
        for w, s, persistent in [(4, 5, True), (4, 5, False), (4, 4, True), (8, 4, False)]
    ]


def _fit(configs, named_args, **kwargs):
    return fit_to_mask(configs, named_args, BLOCK_M=kwargs["MASK_BM"], BLOCK_N=kwargs["MASK_BN"])


_KEY = ["M_KEY", "N_KEY", "K_KEY", "A_T", "B_T", "MASK_BM", "MASK_BN"]
_tuned = autotuned(sparse_output_matmul_kernel, _configs(tma=False), _KEY, _fit)
_tuned_tma = autotuned(sparse_output_matmul_tma_kernel, _configs(tma=True), _KEY, _fit)


def _interpreter_config(mask_block):
    """The interpreter pays per program and per loop step: the biggest tiles."""
    return dict(BLOCK_M=mask_block[0], BLOCK_N=mask_block[1], BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1)


def sparse_output_matmul(a, b, keep, mask_block, scale, bias=None, out=None, allow_tf32=False, config=None, tma=None):
    """scale * (a @ b (+ bias)) ⊙ mask -> (M, N), for 2-D a (M, K) and b (K, N) of any strides.

    keep: (cdiv(M, mask_block[0]), cdiv(N, mask_block[1])) uint8 or bool, 1 = tile kept.
    config: kernel tiles and launch options instead of autotuning (tiles must divide the mask's block).
    tma: read operands through the tensor memory accelerator; None picks it where it works.
    out: optional (M, N) tensor (any strides) to write into; every element is written.
    """
    check_matmul_operands(a, b)
    M, K = a.shape
    N = b.shape[1]
    keep_shape = (triton.cdiv(M, mask_block[0]), triton.cdiv(N, mask_block[1]))
    if keep.dtype not in (torch.uint8, torch.bool):
        raise TypeError(f"keep must be uint8 or bool, got {keep.dtype}")
    if tuple(keep.shape) != keep_shape:
        raise ValueError(f"keep must have shape {keep_shape}, got {tuple(keep.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    elif out.shape != (M, N):
        raise ValueError(f"out must have shape ({M}, {N}), got {tuple(out.shape)}")
    keep = keep.to(torch.uint8)  # a no-op for uint8; bool is widened, not viewed (Inductor cannot view bool)

    with run_in_interpreter_dtype(out, a, b, bias) as (out_, a, b, bias):
        use_tma, a_t, b_t, strides = kernel_operands(a, b, tma, mask_block)
        kernel, tuned = (
            (sparse_output_matmul_tma_kernel, _tuned_tma) if use_tma else (sparse_output_matmul_kernel, _tuned)
        )
        config = config or (_interpreter_config(mask_block) if interpreting() else None)
        launch, grid, meta = launch_config(
            kernel, tuned, config, ("BLOCK_M", "BLOCK_N"), mask_block, M, N, persistent=use_tma, a=a
        )
        launch[grid](
            a,
            b,
            out_,
            bias,
            keep,
            M,
            N,
            K,
            size_key(M),
            size_key(N),
            size_key(K),
            *strides,
            out_.stride(0),
            out_.stride(1),
            keep.stride(0),
            keep.stride(1),
            float(scale),
            A_T=a_t,
            B_T=b_t,
            MASK_BM=mask_block[0],
            MASK_BN=mask_block[1],
            HAS_BIAS=bias is not None,
            INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
            **meta,
        )
    return out
