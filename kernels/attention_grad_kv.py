"""The dK/dV kernel of the block-dropout attention backward (attention_backward.py has the
equations and the launcher): one program per key tile, looping over the query tiles of every
head of its group, so grouped-query attention sums its gradients without atomics."""

import triton
import triton.language as tl

from .attention_tiling import (
    LOG2E,
    listed_bounds,
    listed_tile,
    query_tiles,
    scores,
    store_tile,
    tile_kept,
    transposed_tile,
)
from .tiling import operand, operand_tile


@triton.jit
def attention_grad_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    keep_ptr,
    grad_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    ds_ptr,
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
    STORE_DS: tl.constexpr,
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
    """q, mask as in attention_forward_kernel; keep as there, but under DROP_KEYS its lists are by
    block-column, their line stride in stride_keep_n and their entry stride in stride_keep_m;
    k: (B, H // GROUP, LK, E), v: (B, H // GROUP, LK, EV); grad: (B, H, LQ, EV), dO; lse, delta:
    (B, H, LQ) float32 contiguous; dk, dv: contiguous like k and v; ds: (B, H, LQ, LK) float32
    contiguous if STORE_DS (zeros where causality or DROP_KEYS skips a tile).

    Program (j, hk, b) computes dK and dV of key rows [j * BLOCK_N, (j + 1) * BLOCK_N) of kv head
    hk, summed over the GROUP query heads hk * GROUP + g that read it: for each query tile (under
    IS_CAUSAL only those at or past the diagonal) P = exp(S − lse); dV += (P m s)ᵀ dO and
    dP = dO Vᵀ m s, m the tile's 1 or 0 (under DROP_KEYS dropped tiles are never visited);
    dS = P (dP − D); dK += dSᵀ Q. dK is scaled by scale at the end. STORE_DS also writes dS (the
    additive mask's gradient). TMA, WARP_SPECIALIZE: as in attention_forward_kernel."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BN % BLOCK_N == 0, "tiles must divide the mask's block")
    # Inductor passes Python floats as float64: see attention_forward_kernel.
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_src = operand(k_ptr + b * stride_kb + hk * stride_kh, LK, E, stride_kn, stride_ke, BLOCK_N, BLOCK_E, False, TMA)
    v_src = operand(v_ptr + b * stride_vb + hk * stride_vh, LK, EV, stride_vn, stride_ve, BLOCK_N, BLOCK_EV, False, TMA)
    k = operand_tile(k_src, start_n, 0, LK, E, stride_kn, stride_ke, BLOCK_N, BLOCK_E, False, TMA)
    v = operand_tile(v_src, start_n, 0, LK, EV, stride_vn, stride_ve, BLOCK_N, BLOCK_EV, False, TMA)
    dk = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_EV), dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        q_src = operand(q_base, LQ, E, stride_qm, stride_qe, BLOCK_M, BLOCK_E, False, TMA)
        grad_base = grad_ptr + b * stride_gb + h * stride_gh
        do_src = operand(grad_base, LQ, EV, stride_gm, stride_ge, BLOCK_M, BLOCK_EV, False, TMA)
        mask_base = mask_ptr + b * stride_mb + h * stride_mh if HAS_MASK else mask_ptr
        keep_base = keep_ptr + b * stride_keep_b + h * stride_keep_h
        rows = (b * H + h) * LQ
        sources = (q_src, do_src, LQ, E, EV, stride_qm, stride_qe, stride_gm, stride_ge)
        masking = (LK, qk_scale, drop_scale, stride_mm, stride_mn, lse_ptr + rows, delta_ptr + rows)
        table = (keep_base, stride_keep_m, stride_keep_n)
        ds_base = ds_ptr + rows * LK if STORE_DS else ds_ptr
        # The query tiles that straddle the diagonal apply the causal test; the rest skip it.
        if DROP_KEYS:
            start = 0
            inner_start, end = listed_bounds(keep_base + (start_n // MASK_BN) * stride_keep_n, stride_keep_m, MASK_BM)
        else:
            start, inner_start = query_tiles(start_n, LQ, IS_CAUSAL, BLOCK_M, BLOCK_N)
            end = LQ
        dk, dv = _query_loop(
            dk, dv, k, v, offs_n, start_n, start, inner_start, sources, mask_base, masking, table, ds_base,
            HAS_MASK, MASK_BOOL, IS_CAUSAL, DROP_KEYS, STORE_DS, MASK_BM, MASK_BN, BLOCK_M, BLOCK_E, BLOCK_EV, True,
            INPUT_PRECISION, TMA, WARP_SPECIALIZE,
        )  # fmt: skip
        dk, dv = _query_loop(
            dk, dv, k, v, offs_n, start_n, inner_start, end, sources, mask_base, masking, table, ds_base, HAS_MASK,
            MASK_BOOL, IS_CAUSAL, DROP_KEYS, STORE_DS, MASK_BM, MASK_BN, BLOCK_M, BLOCK_E, BLOCK_EV, False,
            INPUT_PRECISION, TMA, WARP_SPECIALIZE,
        )  # fmt: skip
    kv_rows = (b * (H // GROUP) + hk) * LK
    store_tile(dk_ptr + kv_rows * E, dk * scale, offs_n, tl.arange(0, BLOCK_E), LK, E, E, 1)
    store_tile(dv_ptr + kv_rows * EV, dv, offs_n, tl.arange(0, BLOCK_EV), LK, EV, EV, 1)


@triton.jit
def _query_loop(
    dk,
    dv,
    k,
    v,
    offs_n,
    start_n,
    lo,
    hi,
    sources,
    mask_base,
    masking,
    table,
    ds_ptr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DROP_KEYS: tl.constexpr,
    STORE_DS: tl.constexpr,
    MASK_BM: tl.constexpr,
    MASK_BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    EDGE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """dK and dV of one key tile accumulated over the query tiles [lo, hi) of one head (under
    DROP_KEYS, positions in its column's list of kept tiles: listed_tile). Works on
    the transposes (Sᵀ = K Qᵀ, Pᵀ, dPᵀ = V dOᵀ, dSᵀ), as the Triton tutorial's backward does, so
    that Pᵀ and dSᵀ, the left operands of dV's and dK's products, are made where they are used:
    transposing them in registers cost shared-memory round trips and, at large tiles, spills."""
    q_src, do_src, LQ, E, EV, stride_qm, stride_qe, stride_gm, stride_ge = sources
    LK, qk_scale, drop_scale, stride_mm, stride_mn, lse_ptr, delta_ptr = masking
    keep_base, stride_keep_m, stride_keep_n = table
    for position in tl.range(lo, hi, BLOCK_M, warp_specialize=WARP_SPECIALIZE):
        if DROP_KEYS:
            start_m = listed_tile(keep_base + (start_n // MASK_BN) * stride_keep_n, position, stride_keep_m, MASK_BM)
            factor = drop_scale
        else:
            start_m = position
            kept = tile_kept(keep_base, start_m, start_n, stride_keep_m, stride_keep_n, MASK_BM, MASK_BN)
            factor = tl.where(kept, drop_scale, 0.0)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_t = transposed_tile(q_src, start_m, LQ, E, stride_qm, stride_qe, BLOCK_M, BLOCK_E, TMA)
        do = operand_tile(do_src, start_m, 0, LQ, EV, stride_gm, stride_ge, BLOCK_M, BLOCK_EV, False, TMA)
        lse = tl.load(lse_ptr + offs_m, mask=offs_m < LQ, other=float("inf"))
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < LQ, other=0.0)
        s_t = scores(
            k, q_t, offs_m, offs_n, LQ, LK, qk_scale, mask_base, stride_mm, stride_mn,
            HAS_MASK, MASK_BOOL, IS_CAUSAL, INPUT_PRECISION, EDGE, True,
        )  # fmt: skip
        p_t = tl.math.exp2(s_t - lse[None, :] * LOG2E)
        dv = tl.dot((p_t * factor).to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION) * factor
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=INPUT_PRECISION)
        if STORE_DS:
            store_tile(ds_ptr, ds_t, offs_n, offs_m, LK, LQ, 1, LK)
    return dk, dv
