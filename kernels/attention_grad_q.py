"""The dQ kernel of the block-dropout attention backward (attention_backward.py has the equations
and the launcher): one program per query tile, looping over key tiles."""

import triton
import triton.language as tl

from .attention_tiling import (
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
from .tiling import operand, operand_tile


@triton.jit
def attention_grad_q_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    keep_ptr,
    grad_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
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
    stride_gb,
    stride_gh,
    stride_gm,
    stride_ge,
    qk_scale,
    scale,
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
    """Operands as in attention_forward_kernel (keep included), grad, lse and delta as in
    attention_grad_kv_kernel; dq: (B, H, LQ, E) contiguous. Program (i, h, b) computes dQ of query
    rows [i * BLOCK_M, (i + 1) * BLOCK_M) of head h: for each key tile (under IS_CAUSAL those up to
    the diagonal; under DROP_KEYS kept ones only) P = exp(S − lse); dP = dO Vᵀ m s, m the tile's 1
    or 0; dQ += P (dP − D) K; scaled by scale at the end."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BN % BLOCK_N == 0, "tiles must divide the mask's block")
    # Inductor passes Python floats as float64: see attention_forward_kernel.
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    start_m = query_tile(IS_CAUSAL) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = (b * H + h) * LQ
    q_src = operand(q_ptr + b * stride_qb + h * stride_qh, LQ, E, stride_qm, stride_qe, BLOCK_M, BLOCK_E, False, TMA)
    grad_base = grad_ptr + b * stride_gb + h * stride_gh
    do_src = operand(grad_base, LQ, EV, stride_gm, stride_ge, BLOCK_M, BLOCK_EV, False, TMA)
    q = operand_tile(q_src, start_m, 0, LQ, E, stride_qm, stride_qe, BLOCK_M, BLOCK_E, False, TMA)
    do = operand_tile(do_src, start_m, 0, LQ, EV, stride_gm, stride_ge, BLOCK_M, BLOCK_EV, False, TMA)
    lse = tl.load(lse_ptr + rows + offs_m, mask=offs_m < LQ, other=float("inf"))
    delta = tl.load(delta_ptr + rows + offs_m, mask=offs_m < LQ, other=0.0)
    k_src = operand(k_ptr + b * stride_kb + hk * stride_kh, LK, E, stride_kn, stride_ke, BLOCK_N, BLOCK_E, False, TMA)
    v_src = operand(v_ptr + b * stride_vb + hk * stride_vh, LK, EV, stride_vn, stride_ve, BLOCK_N, BLOCK_EV, False, TMA)
    sources = (k_src, v_src, LK, E, EV, stride_kn, stride_ke, stride_vn, stride_ve)
    mask_base = mask_ptr + b * stride_mb + h * stride_mh if HAS_MASK else mask_ptr
    masking = (LQ, qk_scale, drop_scale, stride_mm, stride_mn, lse, delta)
    table = (keep_ptr + b * stride_keep_b + h * stride_keep_h, stride_keep_m, stride_keep_n)
    dq = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    if DROP_KEYS:
        inner_end, end = listed_bounds(table[0] + (start_m // MASK_BM) * stride_keep_m, stride_keep_n, MASK_BN)
    else:
        inner_end, end = key_tiles(start_m, LK, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_key_loop(
        dq, q, do, offs_m, start_m, 0, inner_end, sources, mask_base, masking, table, HAS_MASK, MASK_BOOL, IS_CAUSAL,
        DROP_KEYS, MASK_BM, MASK_BN, BLOCK_N, BLOCK_E, BLOCK_EV, False, INPUT_PRECISION, TMA, WARP_SPECIALIZE,
    )  # fmt: skip
    dq = _dq_key_loop(
        dq, q, do, offs_m, start_m, inner_end, end, sources, mask_base, masking, table, HAS_MASK, MASK_BOOL, IS_CAUSAL,
        DROP_KEYS, MASK_BM, MASK_BN, BLOCK_N, BLOCK_E, BLOCK_EV, True, INPUT_PRECISION, TMA, WARP_SPECIALIZE,
    )  # fmt: skip
    store_tile(dq_ptr + rows * E, dq * scale, offs_m, tl.arange(0, BLOCK_E), LQ, E, E, 1)


@triton.jit
def _dq_key_loop(
    dq,
    q,
    do,
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
    """dQ of one query tile accumulated over the key tiles [lo, hi) (under DROP_KEYS, positions in
    its row's list of kept tiles: listed_tile)."""
    k_src, v_src, LK, E, EV, stride_kn, stride_ke, stride_vn, stride_ve = sources
    LQ, qk_scale, drop_scale, stride_mm, stride_mn, lse, delta = masking
    keep_base, stride_keep_m, stride_keep_n = table
    for position in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        if DROP_KEYS:
            start_n = listed_tile(keep_base + (start_m // MASK_BM) * stride_keep_m, position, stride_keep_n, MASK_BN)
            factor = drop_scale
        else:
            start_n = position
            kept = tile_kept(keep_base, start_m, start_n, stride_keep_m, stride_keep_n, MASK_BM, MASK_BN)
            factor = tl.where(kept, drop_scale, 0.0)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = operand_tile(k_src, start_n, 0, LK, E, stride_kn, stride_ke, BLOCK_N, BLOCK_E, False, TMA)
        s = scores(
            q, tl.trans(k), offs_m, offs_n, LQ, LK, qk_scale, mask_base, stride_mm, stride_mn,
            HAS_MASK, MASK_BOOL, IS_CAUSAL, INPUT_PRECISION, EDGE,
        )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None] * LOG2E)
        v_t = transposed_tile(v_src, start_n, LK, EV, stride_vn, stride_ve, BLOCK_N, BLOCK_EV, TMA)
        dp = tl.dot(do, v_t, input_precision=INPUT_PRECISION) * factor
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq
