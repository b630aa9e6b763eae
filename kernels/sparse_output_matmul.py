"""Dense A times dense B into block-sparse C (the "SDD" primitive).

C[M, N] = scale * (A[M, K] @ B[K, N] (+ bias[N])) ⊙ mask, where the mask is made of
(MASK_BM, MASK_BN) tiles given densely as a (cdiv(M, MASK_BM), cdiv(N, MASK_BN)) 0/1 table.
Every output tile is written: kept tiles get the product, dropped tiles get zeros without
loading anything (their K loop runs zero times, so the kernel has no branch).

With a column list instead of the table, C is compact: block-row i lists B's column tiles
columns[i, :], and C's column tile j of block-row i is that block-row's product with B's column
tile columns[i, j] (every listed tile computed, none of the others). Columns of a listed tile
past B's last are written -inf: they have no neuron, and a softmax over C must leave them out.

Roles: the input-side dropout's input gradient (A = dY, B = W, C = dX), the output-side
dropout's forward (A = X, B = Wᵀ, with the bias, which a dropped tile drops too), and with a
column list the sampled softmax's compact logits (A = X, B = Wᵀ, each block-row its tiles).

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
    table_ptr,
    M,
    N,
    K,
    M_KEY,
    N_KEY,
    K_KEY,
    B_N,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_table_m,
    stride_table_n,
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
    COLUMNS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """a: (M, K), b: (K, B_N), c: (M, N), bias: (B_N,) if HAS_BIAS. table: without COLUMNS the
    keep table (cdiv(M, MASK_BM), cdiv(N, MASK_BN)) uint8, and B_N = N; with COLUMNS the column
    list (cdiv(M, MASK_BM), N / MASK_BN) int32 of b's column tiles, c compact. BLOCK_M divides
    MASK_BM and BLOCK_N divides MASK_BN. With TMA, a has unit stride along K (along M if A_T) and
    b along N (along K if B_T). Programs stride over the output tiles (one each unless the
    launcher runs fewer: PERSISTENT only tells it to; a dropped tile then costs its program a
    store of zeros). *_KEY (sizes rounded up to powers of two), A_T, B_T and COLUMNS key the
    autotuning."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BN % BLOCK_N == 0, "tiles must divide the mask's block")
    a_src = operand(a_ptr, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T, TMA)
    b_src = operand(b_ptr, K, B_N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T, TMA)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=TMA):
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        table_m = (pid_m * BLOCK_M) // MASK_BM
        table_n = (pid_n * BLOCK_N) // MASK_BN
        entry = tl.load(table_ptr + table_m * stride_table_m + table_n * stride_table_n).to(tl.int32)
        if COLUMNS:
            keep = 1
            col = entry * MASK_BN + (pid_n * BLOCK_N) % MASK_BN
        else:
            keep = entry
            col = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K) * keep):
            k = k0 * BLOCK_K
            a = operand_tile(a_src, pid_m * BLOCK_M, k, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T, TMA)
            b = operand_tile(b_src, k, col, K, B_N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T, TMA)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_b = col + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc += bias_row(bias_ptr, offs_b, B_N, keep != 0)
        acc = acc * scale
        if COLUMNS:
            acc = tl.where(offs_b[None, :] < B_N, acc, float("-inf"))
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        store_tile(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cn)


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
    sparse_output_matmul_kernel,
    _configs,
    ("BLOCK_M", "BLOCK_N"),
    ("MASK_BM", "MASK_BN"),
    _interpreter_tiles,
    mode_names=("COLUMNS",),
)


def sparse_output_matmul(
    a, b, keep, mask_block, scale, bias=None, out=None, allow_tf32=False, config=None, tma=None, columns=None
):
    """scale * (a @ b (+ bias)) ⊙ mask -> (M, N), for 2-D a (M, K) and b (K, N) of any strides.

    keep: (cdiv(M, mask_block[0]), cdiv(N, mask_block[1])) uint8 or bool, 1 = tile kept.
    columns: instead of keep (pass keep=None), (cdiv(M, mask_block[0]), width) int32 column tiles
    of b for each block-row: the result is then compact, (M, width * mask_block[1]), its column
    tile j of block-row i the product with b's column tile columns[i, j] (+ that tile's bias),
    and columns past b's last are -inf. Entries must lie in [0, cdiv(N, mask_block[1])).
    config: kernel tiles and launch options instead of autotuning (tiles must divide the mask's block),
    or "first": the first autotuning candidate fitted to the mask, untuned.
    tma: read operands through the tensor memory accelerator; None picks it where it works.
    out: optional tensor of the result's shape (any strides) to write into; every element is written.
    """
    if columns is None:
        if keep is None:
            raise ValueError("keep is None: pass the keep table, or a columns list")
        M, _, N = check_operands(a, b, bias, out)
        keep_shape = (triton.cdiv(M, mask_block[0]), triton.cdiv(N, mask_block[1]))
        if keep.dtype not in (torch.uint8, torch.bool):
            raise TypeError(f"keep must be uint8 or bool, got {keep.dtype}")
        if tuple(keep.shape) != keep_shape:
            raise ValueError(f"keep must have shape {keep_shape}, got {tuple(keep.shape)}")
        table = keep.to(torch.uint8)  # a no-op for uint8; bool is widened, not viewed (Inductor cannot view bool)
    else:
        _check_columns_type(columns, keep)
        M, _, N = check_operands(a, b, bias, out, cols=columns.shape[1] * mask_block[1])
        n_block_rows = triton.cdiv(M, mask_block[0])
        if columns.shape[0] != n_block_rows or columns.device != a.device:
            raise ValueError(
                f"columns must have shape ({n_block_rows}, width) on {a.device}, got {tuple(columns.shape)} on "
                f"{columns.device}"
            )
        table = columns
    strides = (table.stride(0), table.stride(1))
    shape, sizes, modes = (M, N), (b.shape[1],), dict(COLUMNS=columns is not None)
    return MATMUL(a, b, (table,), strides, mask_block, scale, bias, out, allow_tf32, config, tma, shape, sizes, modes)


def _check_columns_type(columns, keep):
    if keep is not None:
        raise ValueError("pass either keep or columns, not both (keep=None with a columns list)")
    if not isinstance(columns, torch.Tensor) or columns.dtype != torch.int32:
        raise TypeError(f"columns must be an int32 tensor, got {getattr(columns, 'dtype', type(columns).__name__)}")
    if columns.dim() != 2 or columns.shape[1] == 0:
        raise ValueError(f"columns must be 2-D (block-rows, width >= 1), got shape {tuple(columns.shape)}")
