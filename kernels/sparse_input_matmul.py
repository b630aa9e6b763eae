"""Block-sparse A times dense B into dense C (the "DSD" primitive).

C[M, N] = scale * (A ⊙ mask)[M, K] @ B[K, N] (+ bias[N]), where the mask is made of
(MASK_BM, MASK_BK) tiles and block-row i keeps the tiles listed in kept[i, :count[i]].
Each program loops over its block-row's kept K-tiles only, so dropped tiles are never
loaded or multiplied, and the loop body has no branch.

Two options read A other than at the listed tile, B always at it: a compact A (compact_a) holds
only the listed tiles, step j's at A's K-tile j; listed A rows (a_row_blocks) give each step its
own A row-block a_row_blocks[i, j], so C's block-row i gathers a sum over row-blocks of A (and C
is as tall as out, not as A).

Roles: the input-side dropout forward (A = X, B = Wᵀ) and its weight gradient
(A = Xᵀ with the mask's column lists, B = dY, C = dWᵀ); the output-side dropout's input
gradient (A = dY, B = W, C = dX) and weight gradient (A = dYᵀ with the mask's column lists,
B = X, C = dW); the sampled softmax's input gradient (A = dZ compact, B = W, each block-row's
tiles) and weight gradient (A = dZᵀ, B = X, C = dW: each tile lists the block-rows that chose it
and, as A's row-blocks, where in their compact dZ they hold it).

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
def sparse_input_matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    kept_ptr,
    count_ptr,
    a_rows_ptr,
    M,
    N,
    K,
    M_KEY,
    N_KEY,
    K_KEY,
    A_M,
    A_K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_kept_m,
    stride_kept_k,
    stride_count,
    stride_a_rows_m,
    stride_a_rows_k,
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
    COMPACT_A: tl.constexpr,
    LISTED_A_ROWS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """a: (A_M, A_K), b: (K, N), c: (M, N), bias: (N,) if HAS_BIAS,
    kept: (cdiv(M, MASK_BM), width) int32 K-tile indices, count: per block-row int32,
    a_rows: like kept, A's row-block of each step if LISTED_A_ROWS (else unread). A is (M, K)
    unless COMPACT_A (A_K = width * MASK_BK, step j at A's K-tile j) or LISTED_A_ROWS.
    BLOCK_M divides MASK_BM and BLOCK_K divides MASK_BK, so the tiles the kernel uses
    never change which elements are dropped. With TMA, a has unit stride along K (along M if
    A_T) and b along N (along K if B_T). Programs stride over the output tiles (one each unless
    the launcher runs fewer: PERSISTENT only tells it to). *_KEY (sizes rounded up to powers of
    two), A_T, B_T and the two modes key the autotuning."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BK % BLOCK_K == 0, "tiles must divide the mask's block")
    a_src = operand(a_ptr, A_M, A_K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T, TMA)
    b_src = operand(b_ptr, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T, TMA)
    SUB_K: tl.constexpr = MASK_BK // BLOCK_K
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=TMA):
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        block_row = (pid_m * BLOCK_M) // MASK_BM
        kept_row = kept_ptr + block_row * stride_kept_m
        a_rows_row = a_rows_ptr + block_row * stride_a_rows_m
        steps = tl.load(count_ptr + block_row * stride_count) * SUB_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, steps):
            slot = step // SUB_K
            sub_k = (step % SUB_K) * BLOCK_K
            k = tl.load(kept_row + slot * stride_kept_k) * MASK_BK + sub_k
            a_k = k
            if COMPACT_A:
                a_k = slot * MASK_BK + sub_k
            a_m = pid_m * BLOCK_M
            if LISTED_A_ROWS:
                a_m = tl.load(a_rows_row + slot * stride_a_rows_k) * MASK_BM + (pid_m * BLOCK_M) % MASK_BM
            a = operand_tile(a_src, a_m, a_k, A_M, A_K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T, TMA)
            b = operand_tile(b_src, k, pid_n * BLOCK_N, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T, TMA)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = acc * scale
        if HAS_BIAS:
            acc += bias_row(bias_ptr, offs_n, N, True)
        store_tile(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cn)


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
            triton.Config(
                dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, PERSISTENT=False), num_warps=w, num_stages=s
            )
            for bk, w, s in [(64, 8, 3), (64, 4, 4), (128, 8, 3)]
        ]
    return [
        triton.Config(
            dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, PERSISTENT=persistent), num_warps=w, num_stages=s
        )
        for bn, w, s, persistent in [(256, 8, 5, True), (128, 4, 5, False), (128, 4, 5, True), (128, 8, 5, True)]
    ]


def _interpreter_tiles(mask_block):
    """The interpreter pays per program and per loop step: the biggest tiles."""
    return dict(BLOCK_M=mask_block[0], BLOCK_N=64, BLOCK_K=mask_block[1], GROUP_M=1, num_warps=4, num_stages=1)


MATMUL = MaskedMatmul(
    sparse_input_matmul_kernel,
    _configs,
    ("BLOCK_M", "BLOCK_K"),
    ("MASK_BM", "MASK_BK"),
    _interpreter_tiles,
    mode_names=("COMPACT_A", "LISTED_A_ROWS"),
)


def sparse_input_matmul(
    a,
    b,
    kept,
    count,
    mask_block,
    scale,
    bias=None,
    out=None,
    allow_tf32=False,
    config=None,
    tma=None,
    compact_a=False,
    a_row_blocks=None,
):
    """scale * (a ⊙ mask) @ b (+ bias) -> (M, N), for 2-D a (M, K) and b (K, N) of any strides.

    kept: (cdiv(M, mask_block[0]), width) int32, block-row i keeps K-tiles kept[i, :count[i]];
    count: int32 with one entry per block-row, or a single entry shared by all rows.
    compact_a: a is (M, width * mask_block[1]), holding only the kept tiles: step j of block-row
    i reads a's K-tile j and b's K-tile kept[i, j].
    a_row_blocks: like kept, int32: step j of block-row i reads a's row-block a_row_blocks[i, j]
    (the result's row-block i gathers over a's); needs out, whose rows the result has
    (cdiv(rows, mask_block[0]) = kept's). Entries (kept's, a_row_blocks') must lie inside a and b.
    config: kernel tiles and launch options instead of autotuning (tiles must divide the mask's block),
    or "first": the first autotuning candidate fitted to the mask, untuned.
    tma: read operands through the tensor memory accelerator; None picks it where it works.
    out: optional (M, N) tensor (any strides) to write into.
    """
    if not isinstance(compact_a, bool):
        raise TypeError(f"compact_a must be a bool, got {compact_a!r}")
    if kept.dtype != torch.int32 or count.dtype != torch.int32:
        raise TypeError(f"kept and count must be int32, got {kept.dtype} and {count.dtype}")
    if kept.dim() != 2:
        raise ValueError(f"kept must have shape (block-rows, width), got {tuple(kept.shape)}")
    rows = _check_a_row_blocks(a_row_blocks, kept, out)
    inner = kept.shape[1] * mask_block[1] if compact_a else None
    M, _, _ = check_operands(a, b, bias, out, inner=inner, rows=rows)
    n_block_rows = triton.cdiv(M, mask_block[0])
    if kept.shape[0] != n_block_rows:
        raise ValueError(f"kept must have shape ({n_block_rows}, width), got {tuple(kept.shape)}")
    if count.numel() not in (1, n_block_rows):
        raise ValueError(f"count must have 1 or {n_block_rows} entries, got {count.numel()}")
    a_rows = kept if a_row_blocks is None else a_row_blocks  # unread without LISTED_A_ROWS
    mask_strides = (
        kept.stride(0),
        kept.stride(1),
        0 if count.numel() == 1 else count.stride(0),
        a_rows.stride(0),
        a_rows.stride(1),
    )
    shape, sizes = (M, b.shape[1]), a.shape
    modes = dict(COMPACT_A=compact_a, LISTED_A_ROWS=a_row_blocks is not None)
    mask = (kept, count, a_rows)
    return MATMUL(a, b, mask, mask_strides, mask_block, scale, bias, out, allow_tf32, config, tma, shape, sizes, modes)


def _check_a_row_blocks(a_row_blocks, kept, out):
    """The result's rows: out's where a_row_blocks lists a's row-blocks, else None (a's)."""
    if a_row_blocks is None:
        return None
    if not isinstance(a_row_blocks, torch.Tensor) or a_row_blocks.dtype != torch.int32:
        got = getattr(a_row_blocks, "dtype", type(a_row_blocks).__name__)
        raise TypeError(f"a_row_blocks must be an int32 tensor, got {got}")
    if a_row_blocks.shape != kept.shape:
        raise ValueError(f"a_row_blocks must have kept's shape {tuple(kept.shape)}, got {tuple(a_row_blocks.shape)}")
    if out is None:
        raise ValueError("a_row_blocks needs out: the result's rows are not a's")
    return out.shape[0]
