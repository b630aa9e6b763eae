"""Dense A times dense B into block-sparse C (the "SDD" primitive).

C[M, N] = scale * (A[M, K] @ B[K, N] (+ bias[N])) ⊙ mask, where the mask is made of
(MASK_BM, MASK_BN) tiles given densely as a (cdiv(M, MASK_BM), cdiv(N, MASK_BN)) 0/1 table.
Every output tile is written: kept tiles get the product, dropped tiles get zeros without
loading anything (their K loop runs zero times, so the kernel has no branch).

Roles: the input-side dropout's input gradient (A = dY, B = W, C = dX) and the output-side
dropout's forward (A = X, B = Wᵀ, with the bias, which a dropped tile drops too).

One kernel, two paths: with TMA it reads its operands through the tensor memory accelerator
(Hopper and newer, 16-bit operands with 16-byte aligned rows) and may run persistently; without,
through pointers (any GPU, and Triton's interpreter).
"""

import torch
import triton
import triton.language as tl

from .masked_matmul import MaskedMatmul, check_operands
from .tiling import bias_row, grouped_tile, operand, operand_tile, store_tile


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
    TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """a: (M, K), b: (K, N), c: (M, N), bias: (N,) if HAS_BIAS,
    keep: (cdiv(M, MASK_BM), cdiv(N, MASK_BN)) uint8. BLOCK_M divides MASK_BM and BLOCK_N
    divides MASK_BN. With TMA, a has unit stride along K (along M if A_T) and b along N (along
    K if B_T). Programs stride over the output tiles (one each unless the launcher runs fewer:
    PERSISTENT only tells it to; a dropped tile then costs its program a store of zeros).
    *_KEY (sizes rounded up to powers of two), A_T and B_T key the autotuning."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BN % BLOCK_N == 0, "tiles must divide the mask's block")
    a_src = operand(a_ptr, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T, TMA)
    b_src = operand(b_ptr, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T, TMA)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=TMA):
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        keep_m = (pid_m * BLOCK_M) // MASK_BM
        keep_n = (pid_n * BLOCK_N) // MASK_BN
        keep = tl.load(keep_ptr + keep_m * stride_keep_m + keep_n * stride_keep_n).to(tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K) * keep):
            k = k0 * BLOCK_K
            a = operand_tile(a_src, pid_m * BLOCK_M, k, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T, TMA)
            b = operand_tile(b_src, k, pid_n * BLOCK_N, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T, TMA)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc += bias_row(bias_ptr, offs_n, N, keep != 0)
        store_tile(c_ptr, acc * scale, offs_m, offs_n, M, N, stride_cm, stride_cn)


def _configs(tma):
    """Autotuning candidates (tiles shrink to fit smaller mask blocks: fit_to_mask). On an H200
    at bf16 (8192, 4096) -> 4096, p = 0.5, the input gradient was fastest with the persistent
    TMA kernel at 128x128x64, 4 warps, 5 stages (0.240 ms; 0.258 not persistent; 0.295 for the
    pointer kernel): bench/sweep_kernel_configs.py, bench/results/kernel_configs.csv. A
    persistent grid splits the tiles evenly but not the kept ones, so with long K loops the
    hardware's own scheduling of one program per tile can win: both are candidates."""
    if not tma:
        return [
            triton.Config(
                dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, PERSISTENT=False), num_warps=w, num_stages=s
            )
            for bk, w, s in [(64, 4, 4), (128, 8, 3), (64, 8, 3)]
        ]
    return [
        triton.Config(
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=persistent), num_warps=w, num_stages=s
        )
        for w, s, persistent in [(4, 5, True), (4, 5, False), (4, 4, True), (8, 4, False)]
    ]


def _interpreter_tiles(mask_block):
    """The interpreter pays per program and per loop step: the biggest tiles."""
    return dict(BLOCK_M=mask_block[0], BLOCK_N=mask_block[1], BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1)


MATMUL = MaskedMatmul(
    sparse_output_matmul_kernel, _configs, ("BLOCK_M", "BLOCK_N"), ("MASK_BM", "MASK_BN"), _interpreter_tiles
)


def sparse_output_matmul(a, b, keep, mask_block, scale, bias=None, out=None, allow_tf32=False, config=None, tma=None):
    """scale * (a @ b (+ bias)) ⊙ mask -> (M, N), for 2-D a (M, K) and b (K, N) of any strides.

    keep: (cdiv(M, mask_block[0]), cdiv(N, mask_block[1])) uint8 or bool, 1 = tile kept.
    config: kernel tiles and launch options instead of autotuning (tiles must divide the mask's block).
    tma: read operands through the tensor memory accelerator; None picks it where it works.
    out: optional (M, N) tensor (any strides) to write into; every element is written.
    """
    M, _, N = check_operands(a, b, bias, out)
    keep_shape = (triton.cdiv(M, mask_block[0]), triton.cdiv(N, mask_block[1]))
    if keep.dtype not in (torch.uint8, torch.bool):
        raise TypeError(f"keep must be uint8 or bool, got {keep.dtype}")
    if tuple(keep.shape) != keep_shape:
        raise ValueError(f"keep must have shape {keep_shape}, got {tuple(keep.shape)}")
    keep = keep.to(torch.uint8)  # a no-op for uint8; bool is widened, not viewed (Inductor cannot view bool)
    strides = (keep.stride(0), keep.stride(1))
    return MATMUL(a, b, (keep,), strides, mask_block, scale, bias, out, allow_tf32, config, tma)
