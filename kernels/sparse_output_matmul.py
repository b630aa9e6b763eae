"""Dense A times dense B into block-sparse C (the "SDD" primitive).

C[M, N] = scale * (A[M, K] @ B[K, N]) ⊙ mask, where the mask is made of (MASK_BM, MASK_BN)
tiles given densely as a (cdiv(M, MASK_BM), cdiv(N, MASK_BN)) 0/1 table. Every output tile
is written: kept tiles get the product, dropped tiles get zeros without loading anything
(their K loop runs zero times, so the kernel has no branch).

Roles: the input-side dropout's input gradient (A = dY, B = W, C = dX) and, with roles
permuted, the output-side dropout's forward.
"""

import torch
import triton
import triton.language as tl

from .runtime import check_matmul_operands, interpreting, run_in_interpreter_dtype, traceable
from .tiling import grouped_tile


@triton.jit
def sparse_output_matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    keep_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_keep_m,
    stride_keep_n,
    scale,
    MASK_BM: tl.constexpr,
    MASK_BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """a: (M, K), b: (K, N), c: (M, N), keep: (cdiv(M, MASK_BM), cdiv(N, MASK_BN)) uint8.
    BLOCK_M divides MASK_BM and BLOCK_N divides MASK_BN."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    in_m = offs_m[:, None] < M
    in_n = offs_n[None, :] < N

    keep_m = (pid_m * BLOCK_M) // MASK_BM
    keep_n = (pid_n * BLOCK_N) // MASK_BN
    keep = tl.load(keep_ptr + keep_m * stride_keep_m + keep_n * stride_keep_n).to(tl.int32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K) * keep):
        in_k = offs_k + k0 * BLOCK_K < K
        a = tl.load(a_ptrs, mask=in_m & in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None] & in_n, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    acc = acc * scale
    c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=in_m & in_n)


def _config(mask_block, interpret):
    """Kernel tiles never exceed the mask's tiles (which must stay independent of them)."""
    mask_bm, mask_bn = mask_block
    if interpret:  # the interpreter pays per program and per loop step: the biggest tiles
        return dict(BLOCK_M=mask_bm, BLOCK_N=mask_bn, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1)
    # 4 warps: 0.289 ms against 0.293 with 8, H200, bf16, (8192, 4096, 4096), p = 0.5, block 128
    # (bench/sweep_kernel_configs.py, bench/results/logs/sweep_kernel_configs.log).
    return dict(BLOCK_M=min(128, mask_bm), BLOCK_N=min(128, mask_bn), BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def sparse_output_matmul(a, b, keep, mask_block, scale, out=None, allow_tf32=False, config=None):
    """scale * (a @ b) ⊙ mask -> (M, N), for 2-D a (M, K) and b (K, N) of any strides.

    keep: (cdiv(M, mask_block[0]), cdiv(N, mask_block[1])) uint8 or bool, 1 = tile kept.
    config: kernel tiles and launch options overriding the default (tiles must divide the mask's block).
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
    if out is None:
        out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    elif out.shape != (M, N):
        raise ValueError(f"out must have shape ({M}, {N}), got {tuple(out.shape)}")
    keep = keep.to(torch.uint8)  # a no-op for uint8; bool is widened, not viewed (Inductor cannot view bool)

    with run_in_interpreter_dtype(out, a, b) as (out_, a, b):
        config = config or _config(mask_block, interpreting())
        if mask_block[0] % config["BLOCK_M"] or mask_block[1] % config["BLOCK_N"]:
            raise ValueError(f"kernel tiles {config} must divide the mask's block {mask_block}")
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        traceable(sparse_output_matmul_kernel)[grid](
            a,
            b,
            out_,
            keep,
            M,
            N,
            K,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            out_.stride(0),
            out_.stride(1),
            keep.stride(0),
            keep.stride(1),
            float(scale),
            MASK_BM=mask_block[0],
            MASK_BN=mask_block[1],
            INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
            **config,
        )
    return out
