"""Block-sparse A times dense B into dense C (the "DSD" primitive).

C[M, N] = scale * (A ⊙ mask)[M, K] @ B[K, N] (+ bias[N]), where the mask is made of
(MASK_BM, MASK_BK) tiles and block-row i keeps the tiles listed in kept[i, :count[i]].
Each program loops over its block-row's kept K-tiles only, so dropped tiles are never
loaded or multiplied, and the loop body has no branch.

Two options read A other than at the listed tile, B always at it: a compact A (compact_a) holds
only the listed tiles, step j's at A's K-tile j; listed A rows (a_row_blocks) give each step its
own A row-block a_row_blocks[i, j], so C's block-row i gathers a sum over row-blocks of A (and C
is as tall as out, not as A).

Roles: the input-side dropout forward (A = X, B = Wᵀ, writing X's kept tiles compactly:
compact_out) and its weight gradient (A = that compact copy transposed, with the mask's column
lists and, as A's row-blocks, each listed tile's slot; B = dY, C = dWᵀ); the output-side dropout's input
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
from .runtime import interpreting, multiprocessors
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
    compact_ptr,
    M,
    N,
    K,
    M_KEY,
    N_KEY,
    K_KEY,
    A_M,
    A_K,
    COMPACT_K,
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
    stride_compact_m,
    stride_compact_k,
    stride_c_split,
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
    WRITE_COMPACT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """a: (A_M, A_K), b: (K, N), c: (M, N), bias: (N,) if HAS_BIAS,
    kept: (cdiv(M, MASK_BM), width) int32 K-tile indices, count: per block-row int32,
    a_rows: like kept, A's row-block of each step if LISTED_A_ROWS (else unread). A is (M, K)
    unless COMPACT_A (A_K = width * MASK_BK, step j at A's K-tile j) or LISTED_A_ROWS.
    WRITE_COMPACT: compact (M, COMPACT_K) receives each block-row's listed tiles of A as
    the programs of C's first column-tile read them (step j into compact's K-tile j), and zeros
    past them. SPLIT_K > 1 splits each block-row's steps into SPLIT_K even runs, run s writing
    its partial product at c + s * stride_c_split (no bias).
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
    for work in tl.range(tl.program_id(0), num_tiles * SPLIT_K, tl.num_programs(0), flatten=TMA):
        tile_id = work % num_tiles
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        block_row = (pid_m * BLOCK_M) // MASK_BM
        kept_row = kept_ptr + block_row * stride_kept_m
        a_rows_row = a_rows_ptr + block_row * stride_a_rows_m
        steps = tl.load(count_ptr + block_row * stride_count) * SUB_K
        first, last = 0, steps
        c_split = c_ptr
        if SPLIT_K > 1:
            split = work // num_tiles
            first = split * tl.cdiv(steps, SPLIT_K)
            last = tl.minimum(steps, first + tl.cdiv(steps, SPLIT_K))
            c_split = c_ptr + split.to(tl.int64) * stride_c_split
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(first, last):
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
            if WRITE_COMPACT:
                if pid_n == 0:
                    offs_a = a_m + tl.arange(0, BLOCK_M)
                    offs_compact = slot * MASK_BK + sub_k + tl.arange(0, BLOCK_K)
                    store_tile(compact_ptr, a, offs_a, offs_compact, M, COMPACT_K, stride_compact_m, stride_compact_k)
            b = operand_tile(b_src, k, pid_n * BLOCK_N, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T, TMA)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if WRITE_COMPACT:
            if pid_n == 0:  # zeros in the slots past the count, as masks.gather_tiles leaves there
                zeros = tl.zeros((BLOCK_M, BLOCK_K), dtype=compact_ptr.dtype.element_ty)
                for step in range(steps, tl.cdiv(COMPACT_K, BLOCK_K)):
                    offs_compact = step * BLOCK_K + tl.arange(0, BLOCK_K)
                    store_tile(
                        compact_ptr, zeros, offs_m, offs_compact, M, COMPACT_K, stride_compact_m, stride_compact_k
                    )
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = acc * scale
        if HAS_BIAS:
            acc += bias_row(bias_ptr, offs_n, N, True)
        store_tile(c_split, acc, offs_m, offs_n, M, N, stride_cm, stride_cn)


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
    mode_names=("COMPACT_A", "LISTED_A_ROWS", "WRITE_COMPACT", "SPLIT_K"),
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
    compact_out=None,
    split_k=None,
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
    compact_out: a (M, width * mask_block[1]) tensor of a's dtype that receives a's kept tiles
    compactly as the kernel reads them (block-row i's j-th kept tile at K-tile j, zeros past its
    count: what masks.gather_tiles makes), at no extra read of a. Not with compact_a or
    a_row_blocks.
    split_k: programs per output tile, each summing an even share of its block-row's kept tiles
    into a float32 partial product; the partials are then summed. "auto" chooses
    (split_reduction) where the output tiles would leave multiprocessors idle; None (the default,
    until split_reduction is checked against timings on a GPU) does not split. Not with bias or
    compact_out.
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
    _check_compact_out(compact_out, a, kept, mask_block, compact_a or a_row_blocks is not None)
    a_rows = kept if a_row_blocks is None else a_row_blocks  # unread without LISTED_A_ROWS
    compact = kept if compact_out is None else compact_out  # unwritten without WRITE_COMPACT
    mask_strides = (
        kept.stride(0),
        kept.stride(1),
        0 if count.numel() == 1 else count.stride(0),
        a_rows.stride(0),
        a_rows.stride(1),
        compact.stride(0),
        compact.stride(1),
    )
    shape, sizes = (M, b.shape[1]), (*a.shape, compact.shape[1])
    splits = _splits(split_k, shape, kept.shape[1], a, bias, compact_out)
    listed, writes = a_row_blocks is not None, compact_out is not None
    modes = dict(COMPACT_A=compact_a, LISTED_A_ROWS=listed, WRITE_COMPACT=writes, SPLIT_K=splits)
    mask = (kept, count, a_rows, compact)

    def launch(c, split_stride):
        strides = (*mask_strides, split_stride)
        return MATMUL(a, b, mask, strides, mask_block, scale, bias, c, allow_tf32, config, tma, shape, sizes, modes)

    if splits == 1:
        return launch(out, 0)
    # The kernel is handed every split's rows as one tensor, not a view of the first split's: under
    # torch.compile a tensor a kernel writes is cloned to its own extent (a view then costs a
    # copy), and what the kernel writes outside it is lost.
    partial = torch.empty((splits * shape[0], shape[1]), device=a.device, dtype=torch.float32)
    launch(partial, shape[0] * shape[1])
    total = partial.view(splits, *shape).sum(dim=0)
    return total.to(a.dtype) if out is None else out.copy_(total)


# What a split's float32 partial product costs to write and sum, as a share of the time of one
# wave of output tiles (split_reduction).
SPLIT_COST = 0.05
MAX_SPLITS = 8


def split_reduction(tiles, multiprocessors, steps):
    """How many programs to give each of `tiles` output tiles whose reductions run up to `steps`
    kept tiles: the count that minimises the waves of programs, each doing 1/s of a tile's work,
    plus SPLIT_COST per extra split; at most MAX_SPLITS and steps // 2 (two tiles per split)."""
    candidates = range(1, max(1, min(MAX_SPLITS, steps // 2)) + 1)
    return min(candidates, key=lambda s: -(-tiles * s // multiprocessors) / s + SPLIT_COST * (s - 1))


def _splits(split_k, shape, steps, a, bias, compact_out):
    if split_k is None:
        return 1
    if split_k != "auto":
        if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
            raise ValueError(f'split_k must be a positive int, "auto" or None, got {split_k!r}')
        if split_k > 1 and (bias is not None or compact_out is not None):
            raise ValueError("split_k > 1 cannot be used with bias or compact_out")
        return split_k
    sizes_known = all(isinstance(n, int) for n in shape)
    if bias is not None or compact_out is not None or interpreting() or not a.is_cuda or not sizes_known:
        return 1
    tiles = triton.cdiv(shape[0], 128) * triton.cdiv(shape[1], 128)  # the candidates' usual tile
    return split_reduction(tiles, multiprocessors(), steps)


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


def _check_compact_out(compact_out, a, kept, mask_block, a_is_listed):
    if compact_out is None:
        return
    if a_is_listed:
        raise ValueError("compact_out copies a's kept tiles: it cannot be used with compact_a or a_row_blocks")
    if not isinstance(compact_out, torch.Tensor) or compact_out.dtype != a.dtype or compact_out.device != a.device:
        got = f"{compact_out.dtype} on {compact_out.device}" if isinstance(compact_out, torch.Tensor) else compact_out
        raise TypeError(f"compact_out must be a tensor of a's dtype {a.dtype} on {a.device}, got {got}")
    shape = (a.shape[0], kept.shape[1] * mask_block[1])
    if compact_out.dim() != 2 or compact_out.shape[0] != shape[0] or not 0 < compact_out.shape[1] <= shape[1]:
        raise ValueError(
            f"compact_out must have shape ({shape[0]}, slots * {mask_block[1]}), got {tuple(compact_out.shape)}"
        )
    if compact_out.shape[1] % mask_block[1]:
        raise ValueError(f"compact_out's columns must be whole tiles of {mask_block[1]}, got {compact_out.shape[1]}")
