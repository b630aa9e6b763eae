"""Flash-attention forward under block dropout.

O = (P ⊙ M) V / (1 - p) with P = softmax(q kᵀ · scale + mask): an online softmax over key
tiles (no (Lq, Lk) matrix in memory), the normaliser covering every key, kept or dropped. M is
the tile table: each semantic (MASK_BM, MASK_BN) tile of a (query, key) plane is kept or
dropped whole. A dropped tile still needs q kᵀ (for the normaliser). Saves the log-sum-exp of
each query row (natural units) for the backward pass.

The key loop visits every tile and zeroes a dropped tile's P before P V: the loop has no branch,
so Triton pipelines every load (with V's load under a branch it did not, sm_90 compile); the P V
products of dropped tiles are the price. Under the drop-keys policy (DropKey) a dropped tile is
hidden before the softmax instead, so the loop runs over a list of the kept tiles
(attention_launch.kept_tile_lists) and never visits a dropped one.

The key loop is split in two: the tiles left of the diagonal (and, without causality, all but a
ragged last tile) skip the per-element causal and edge tests; the rest apply them. Operands are
read through pointers (any GPU, and Triton's interpreter) or, opt-in, through the tensor memory
accelerator with Triton's warp specialisation (attention_launch.kernel_meta).
"""

import torch
import triton
import triton.language as tl

from .attention_launch import (
    AttentionKernel,
    check_attention_operands,
    kept_tile_lists,
    kernel_meta,
    mask_view,
    widen,
    widened_for_interpreter,
)
from .attention_tiling import (
    LN2,
    LOG2E,
    key_tiles,
    listed_bounds,
    listed_tile,
    query_tile,
    scores,
    store_tile,
    tile_kept,
    transposed_tile,
)
from .runtime import size_key
from .tiling import operand, operand_tile


@triton.jit
def attention_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    keep_ptr,
    out_ptr,
    lse_ptr,
    H,
    GROUP,
    LQ,
    LK,
    E,
    EV,
    LQ_KEY,
    LK_KEY,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qe,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_ke,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ve,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_keep_b,
    stride_keep_h,
    stride_keep_m,
    stride_keep_n,
    stride_ob,
    stride_oh,
    stride_om,
    stride_oe,
    qk_scale,
    drop_scale,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DROP_KEYS: tl.constexpr,
    MASK_BM: tl.constexpr,
    MASK_BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """q: (B, H, LQ, E), k: (B, H // GROUP, LK, E), v: (B, H // GROUP, LK, EV), mask: the
    attention mask seen as (B, H, LQ, LK) (bool as uint8, or additive; stride 0 on broadcast
    dims) if HAS_MASK, keep: (B, H, cdiv(LQ, MASK_BM), cdiv(LK, MASK_BN)) bool or uint8 tile table
    (under DROP_KEYS, int32 kept-tile lists by block-row: attention_launch.kept_tile_lists),
    out: (B, H, LQ, EV), lse: (B, H, LQ) float32 contiguous.

    Program (i, h, b) computes query rows [i * BLOCK_M, (i + 1) * BLOCK_M) of head h,
    which reads k and v head h // GROUP: out = drop_scale · Σ_kept-tiles P V, lse = log Σ_keys
    exp(scores). qk_scale = scale · log2(e). Rows that see no key (all masked) get out = 0 and
    lse = +inf, so that the backward's recomputed P is 0 there. Under IS_CAUSAL the key tiles
    past the diagonal are never visited, and the tiles left of it skip the per-element causal
    test. DROP_KEYS: dropped tiles are hidden before the softmax (the normaliser covers kept
    tiles only) and never visited. BLOCK_M divides MASK_BM and BLOCK_N divides MASK_BN;
    BLOCK_E and BLOCK_EV are E and EV padded to powers of two. TMA reads q, k and v through
    tensor-memory-accelerator descriptors (16-bit operands, unit stride along the head dim,
    16-byte aligned strides); WARP_SPECIALIZE asks Triton to warp-specialise the key loops."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BN % BLOCK_N == 0, "tiles must divide the mask's block")
    # Inductor passes Python floats to a user kernel as float64 (torch 2.11, H200): in float32 they
    # keep the online softmax's carried values, and the dot accumulator, float32.
    qk_scale, drop_scale = tl.cast(qk_scale, tl.float32), tl.cast(drop_scale, tl.float32)
    start_m = query_tile(IS_CAUSAL) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_src = operand(q_ptr + b * stride_qb + h * stride_qh, LQ, E, stride_qm, stride_qe, BLOCK_M, BLOCK_E, False, TMA)
    k_src = operand(k_ptr + b * stride_kb + hk * stride_kh, LK, E, stride_kn, stride_ke, BLOCK_N, BLOCK_E, False, TMA)
    v_src = operand(v_ptr + b * stride_vb + hk * stride_vh, LK, EV, stride_vn, stride_ve, BLOCK_N, BLOCK_EV, False, TMA)
    q = operand_tile(q_src, start_m, 0, LQ, E, stride_qm, stride_qe, BLOCK_M, BLOCK_E, False, TMA)
    sources = (k_src, v_src, LK, E, EV, stride_kn, stride_ke, stride_vn, stride_ve)
    mask_base = mask_ptr + b * stride_mb + h * stride_mh if HAS_MASK else mask_ptr
    masking = (LQ, qk_scale, stride_mm, stride_mn)
    keep_base = keep_ptr + b * stride_keep_b + h * stride_keep_h
    table = (keep_base, stride_keep_m, stride_keep_n)

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), dtype=tl.float32)
    state = (acc, row_max, row_sum)
    if DROP_KEYS:
        inner_end, end = listed_bounds(keep_base + (start_m // MASK_BM) * stride_keep_m, stride_keep_n, MASK_BN)
    else:
        inner_end, end = key_tiles(start_m, LK, IS_CAUSAL, BLOCK_M, BLOCK_N)
    # Two loops: the first has no per-element causal or edge test, the second covers the diagonal
    # and the ragged last tile.
    state = _key_loop(
        state, q, offs_m, start_m, 0, inner_end, sources, mask_base, masking, table, HAS_MASK, MASK_BOOL, IS_CAUSAL,
        DROP_KEYS, MASK_BM, MASK_BN, BLOCK_N, BLOCK_E, BLOCK_EV, False, INPUT_PRECISION, TMA, WARP_SPECIALIZE,
    )  # fmt: skip
    state = _key_loop(
        state, q, offs_m, start_m, inner_end, end, sources, mask_base, masking, table, HAS_MASK, MASK_BOOL, IS_CAUSAL,
        DROP_KEYS, MASK_BM, MASK_BN, BLOCK_N, BLOCK_E, BLOCK_EV, True, INPUT_PRECISION, TMA, WARP_SPECIALIZE,
    )  # fmt: skip
    acc, row_max, row_sum = state

    seen = row_sum > 0
    out = acc * (drop_scale / tl.where(seen, row_sum, 1.0))[:, None]
    out_base = out_ptr + b * stride_ob + h * stride_oh
    store_tile(out_base, out, offs_m, tl.arange(0, BLOCK_EV), LQ, EV, stride_om, stride_oe)
    lse = tl.where(seen, (row_max + tl.math.log2(tl.where(seen, row_sum, 1.0))) * LN2, float("inf"))
    tl.store(lse_ptr + (b * H + h) * LQ + offs_m, lse, mask=offs_m < LQ)


@triton.jit
def _key_loop(
    state,
    q,
    offs_m,
    start_m,
    lo,
    hi,
    sources,
    mask_base,
    masking,
    table,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DROP_KEYS: tl.constexpr,
    MASK_BM: tl.constexpr,
    MASK_BN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    EDGE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """The online softmax over the key tiles [lo, hi) of the query tile at start_m: state =
    (acc, row_max, row_sum) updated tile by tile. A dropped tile enters the normaliser and its P
    is zeroed before P V (V's loads stay unconditional, so Triton pipelines them). Under DROP_KEYS,
    [lo, hi) are positions in the row's list of kept tiles (listed_tile), so dropped tiles are
    never visited."""
    acc, row_max, row_sum = state
    k_src, v_src, LK, E, EV, stride_kn, stride_ke, stride_vn, stride_ve = sources
    LQ, qk_scale, stride_mm, stride_mn = masking
    keep_base, stride_keep_m, stride_keep_n = table
    for position in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        if DROP_KEYS:
            start_n = listed_tile(keep_base + (start_m // MASK_BM) * stride_keep_m, position, stride_keep_n, MASK_BN)
        else:
            start_n = position
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = transposed_tile(k_src, start_n, LK, E, stride_kn, stride_ke, BLOCK_N, BLOCK_E, TMA)
        s = scores(
            q, k_t, offs_m, offs_n, LQ, LK, qk_scale, mask_base, stride_mm, stride_mn,
            HAS_MASK, MASK_BOOL, IS_CAUSAL, INPUT_PRECISION, EDGE,
        )  # fmt: skip
        new_max = tl.maximum(row_max, tl.max(s, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that have seen no key yet
        p = tl.math.exp2(s - shift[:, None])
        alpha = tl.math.exp2(row_max - shift)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = operand_tile(v_src, start_n, 0, LK, EV, stride_vn, stride_ve, BLOCK_N, BLOCK_EV, False, TMA)
        if not DROP_KEYS:
            p = tl.where(tile_kept(keep_base, start_m, start_n, stride_keep_m, stride_keep_n, MASK_BM, MASK_BN), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


# Candidates (BLOCK_M, BLOCK_N, warps, stages) per padded head dim, best first by their kernel
# times on an H100 (bf16, Triton 3.6, the four benchmark shapes causal and not, pointer and TMA
# paths: bench/results/attention_configs.csv); all compile without register spills for sm_90
# (Triton 3.7, bench/inspect_kernels.py; at head dim 128, 128x32 with 4 warps spilled). At 256 the
# pointer path spills whatever the tiles. AttentionKernel.fit shrinks them to the mask's block and
# to the head dims' bytes.
FORWARD_CONFIGS = {
    64: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4), (64, 32, 4, 2), (128, 128, 8, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2), (64, 64, 8, 3)],
    256: [(64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2)],
}


FORWARD = AttentionKernel(attention_forward_kernel, FORWARD_CONFIGS, resident="BLOCK_M")
LOG2E_VALUE = float(LOG2E.value)


def attention_forward(
    q,
    k,
    v,
    keep,
    mask_block,
    drop_scale,
    scale,
    attn_mask=None,
    is_causal=False,
    allow_tf32=False,
    config=None,
    drop_keys=False,
    tma=None,
    warp_specialize=None,
):
    """(out, lse) of block-dropout attention: out (B, H, Lq, Ev) in q's dtype,
    out = (softmax(q kᵀ · scale + mask) ⊙ M) v · drop_scale, M the tile table keep (B, H,
    cdiv(Lq, BM), cdiv(Lk, BN)) (True or 1 = kept) of semantic blocks mask_block = (BM, BN);
    lse (B, H, Lq) float32, each query row's log-sum-exp (+inf where no key is seen). drop_keys:
    out = softmax(q kᵀ · scale + mask, dropped tiles hidden) v · drop_scale instead (DropKey: the
    normaliser covers kept tiles only; dropped tiles are never visited).

    q (B, H, Lq, E), k (B, Hk, Lk, E), v (B, Hk, Lk, Ev), any strides; head h reads k/v head
    h // (H // Hk). attn_mask: bool (True = attend) or additive, broadcastable to (B, H, Lq, Lk),
    read in place. is_causal: query i sees keys j <= i (top-left aligned). config: kernel tiles
    and launch options (dict(BLOCK_M=, BLOCK_N=, num_warps=, num_stages=)) instead of autotuning.
    tma, warp_specialize: the kernel's opt-in Hopper paths (attention_launch.kernel_meta).
    """
    B, H, Hk, Lq, Lk, E, Ev = check_attention_operands(q, k, v, keep, mask_block, attn_mask)
    if widened_for_interpreter(q):
        args = (widen(q), widen(k), widen(v), keep, mask_block, drop_scale, scale, widen(attn_mask), is_causal)
        out, lse = attention_forward(*args, allow_tf32, config, drop_keys, tma, warp_specialize)
        return out.to(q.dtype), lse
    out = torch.empty((B, H, Lq, Ev), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    mask, mask_strides = mask_view(attn_mask, (B, H, Lq, Lk))
    # keep is read as it is (bool loads as int1, uint8 as int8); drop-keys loops over kept tiles.
    keep = kept_tile_lists(keep, mask_block, Lk, is_causal) if drop_keys else keep
    args = (
        q, k, v, mask, keep, out, lse, H, H // Hk, Lq, Lk, E, Ev, size_key(Lq), size_key(Lk),
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *keep.stride(), *out.stride(),
        float(scale) * LOG2E_VALUE, float(drop_scale),
    )  # fmt: skip
    meta = kernel_meta((q, k, v), mask_block, attn_mask, is_causal, drop_keys, allow_tf32, tma, warp_specialize)
    grid = lambda tiles: (triton.cdiv(Lq, tiles["BLOCK_M"]), H, B)  # noqa: E731
    FORWARD.launch(grid, config, mask_block, q.element_size(), args, meta)
    return out, lse
