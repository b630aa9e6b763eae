"""Flash-attention backward under block dropout.

With P = softmax(S), S = q kᵀ · scale + mask, s = 1 / (1 - p), M the tile table and
O = (P ⊙ M) V s, the gradients are
    dV = (P ⊙ M)ᵀ dO · s,    dP = (dO Vᵀ) ⊙ M · s,    D = rowsum(dO ⊙ O),
    dS = P ⊙ (dP − D),       dQ = dS K · scale,        dK = dSᵀ Q · scale,
and the additive mask's gradient is dS summed over its broadcast dims. P is recomputed per tile
from q, k and the forward's log-sum-exp. On a dropped tile dP = 0, so it skips loading V and the
two GEMMs on the P·V side (dV's and dP's) but still adds dS = −P·D into dQ and dK.

Three kernels: D per query row; dK and dV per key tile, looping over the query tiles of every
head of its group (grouped-query attention sums the group's gradients there, in a fixed order,
without atomics); dQ per query tile, looping over key tiles. Pointer loads only (no
tensor-memory-accelerator path yet).
"""

import torch
import triton
import triton.language as tl

from .attention_launch import (
    AttentionKernel,
    check_attention_operands,
    head_block,
    mask_view,
    widen,
    widened_for_interpreter,
)
from .attention_tiling import LOG2E, load_tile, scores, store_tile, tile_kept
from .runtime import size_key, traceable

DELTA_ROWS = 64


@triton.jit
def attention_delta_kernel(
    out_ptr,
    grad_ptr,
    delta_ptr,
    H,
    LQ,
    EV,
    stride_ob,
    stride_oh,
    stride_om,
    stride_oe,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_ge,
    ROWS: tl.constexpr,
    BLOCK_EV: tl.constexpr,
):
    """out, grad: (B, H, LQ, EV), delta: (B, H, LQ) float32 contiguous. Program (i, h, b) writes
    delta = rowsum(grad ⊙ out) for rows [i * ROWS, (i + 1) * ROWS) of head h."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_ev = tl.arange(0, BLOCK_EV)
    out = load_tile(out_ptr + b * stride_ob + h * stride_oh, offs_m, offs_ev, LQ, EV, stride_om, stride_oe)
    grad = load_tile(grad_ptr + b * stride_gb + h * stride_gh, offs_m, offs_ev, LQ, EV, stride_gm, stride_ge)
    delta = tl.sum(out.to(tl.float32) * grad.to(tl.float32), 1)
    tl.store(delta_ptr + (b * H + h) * LQ + offs_m, delta, mask=offs_m < LQ)


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
    STORE_DS: tl.constexpr,
    MASK_BM: tl.constexpr,
    MASK_BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """q, mask, keep as in attention_forward_kernel; k: (B, H // GROUP, LK, E), v: (B, H // GROUP,
    LK, EV); grad: (B, H, LQ, EV), dO; lse, delta: (B, H, LQ) float32 contiguous; dk, dv:
    contiguous like k and v; ds: (B, H, LQ, LK) float32 contiguous if STORE_DS (zeros where
    causality skips a tile).

    Program (j, hk, b) computes dK and dV of key rows [j * BLOCK_N, (j + 1) * BLOCK_N) of kv head
    hk, summed over the GROUP query heads hk * GROUP + g that read it: for each query tile (under
    IS_CAUSAL only those at or past the diagonal) P = exp(S − lse); on kept tiles
    dV += (P s)ᵀ dO and dP = dO Vᵀ s, on dropped ones dP = 0; dS = P (dP − D); dK += dSᵀ Q.
    dK is scaled by scale at the end. STORE_DS also writes dS (the additive mask's gradient)."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BN % BLOCK_N == 0, "tiles must divide the mask's block")
    # Inductor passes Python floats as float64: see attention_forward_kernel.
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    k_t = load_tile(k_ptr + b * stride_kb + hk * stride_kh, offs_e, offs_n, E, LK, stride_ke, stride_kn)
    v_t = load_tile(v_ptr + b * stride_vb + hk * stride_vh, offs_ev, offs_n, EV, LK, stride_ve, stride_vn)
    dk = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_EV), dtype=tl.float32)
    lo = (start_n // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        grad_base = grad_ptr + b * stride_gb + h * stride_gh
        mask_base = mask_ptr + b * stride_mb + h * stride_mh if HAS_MASK else mask_ptr
        keep_base = keep_ptr + b * stride_keep_b + h * stride_keep_h
        rows = (b * H + h) * LQ
        for start_m in range(lo, LQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = load_tile(q_base, offs_m, offs_e, LQ, E, stride_qm, stride_qe)
            do = load_tile(grad_base, offs_m, offs_ev, LQ, EV, stride_gm, stride_ge)
            lse = tl.load(lse_ptr + rows + offs_m, mask=offs_m < LQ, other=float("inf"))
            delta = tl.load(delta_ptr + rows + offs_m, mask=offs_m < LQ, other=0.0)
            s = scores(
                q, k_t, offs_m, offs_n, LQ, LK, qk_scale, mask_base, stride_mm, stride_mn,
                HAS_MASK, MASK_BOOL, IS_CAUSAL, INPUT_PRECISION,
            )  # fmt: skip
            p = tl.math.exp2(s - lse[:, None] * LOG2E)
            dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if tile_kept(keep_base, start_m, start_n, stride_keep_m, stride_keep_n, MASK_BM, MASK_BN):
                dv = tl.dot(tl.trans((p * drop_scale).to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
                dp = tl.dot(do, v_t, input_precision=INPUT_PRECISION) * drop_scale
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION)
            if STORE_DS:
                store_tile(ds_ptr + (b * H + h) * LQ * LK, ds, offs_m, offs_n, LQ, LK, LK, 1)
    kv_rows = (b * (H // GROUP) + hk) * LK
    store_tile(dk_ptr + kv_rows * E, dk * scale, offs_n, offs_e, LK, E, E, 1)
    store_tile(dv_ptr + kv_rows * EV, dv, offs_n, offs_ev, LK, EV, EV, 1)


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
    MASK_BM: tl.constexpr,
    MASK_BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Operands as in attention_grad_kv_kernel; dq: (B, H, LQ, E) contiguous. Program (i, h, b)
    computes dQ of query rows [i * BLOCK_M, (i + 1) * BLOCK_M) of head h: for each key tile
    (under IS_CAUSAL those up to the diagonal) P = exp(S − lse); dP = dO Vᵀ s on kept tiles, 0
    on dropped ones (V not loaded); dQ += P (dP − D) K; scaled by scale at the end."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BN % BLOCK_N == 0, "tiles must divide the mask's block")
    # Inductor passes Python floats as float64: see attention_forward_kernel.
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    rows = (b * H + h) * LQ
    q = load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_e, LQ, E, stride_qm, stride_qe)
    do = load_tile(grad_ptr + b * stride_gb + h * stride_gh, offs_m, offs_ev, LQ, EV, stride_gm, stride_ge)
    lse = tl.load(lse_ptr + rows + offs_m, mask=offs_m < LQ, other=float("inf"))
    delta = tl.load(delta_ptr + rows + offs_m, mask=offs_m < LQ, other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh if HAS_MASK else mask_ptr
    keep_base = keep_ptr + b * stride_keep_b + h * stride_keep_h
    dq = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    hi = tl.minimum(LK, start_m + BLOCK_M) if IS_CAUSAL else LK
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_base, offs_n, offs_e, LK, E, stride_kn, stride_ke)
        s = scores(
            q, tl.trans(k), offs_m, offs_n, LQ, LK, qk_scale, mask_base, stride_mm, stride_mn,
            HAS_MASK, MASK_BOOL, IS_CAUSAL, INPUT_PRECISION,
        )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None] * LOG2E)
        dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if tile_kept(keep_base, start_m, start_n, stride_keep_m, stride_keep_n, MASK_BM, MASK_BN):
            v_t = load_tile(v_base, offs_ev, offs_n, EV, LK, stride_ve, stride_vn)
            dp = tl.dot(do, v_t, input_precision=INPUT_PRECISION) * drop_scale
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    store_tile(dq_ptr + rows * E, dq * scale, offs_m, offs_e, LQ, E, E, 1)


def _configs(shapes):
    """Candidates (BLOCK_M, BLOCK_N, warps, stages) after the Triton tutorial's fused-attention
    backward (dK/dV: 32 query rows streamed past 128 keys; dQ: the transpose); not yet tuned on a
    GPU here. fit() shrinks them to the mask's block and the head dims."""
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


GRAD_KV = AttentionKernel(
    attention_grad_kv_kernel,
    _configs([(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 2), (16, 64, 4, 2)]),
    resident="BLOCK_N",
    extra_key=("STORE_DS",),
)
GRAD_Q = AttentionKernel(
    attention_grad_q_kernel,
    _configs([(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2), (64, 16, 4, 2)]),
    resident="BLOCK_M",
)
LOG2E_VALUE = float(LOG2E.value)


def attention_backward(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    keep,
    mask_block,
    drop_scale,
    scale,
    attn_mask=None,
    is_causal=False,
    mask_grad=False,
    allow_tf32=False,
    configs=(None, None),
):
    """(dq, dk, dv, d_attn_mask) of attention_forward's out, given grad_out (B, H, Lq, Ev) = dO,
    the forward's out and lse and the same operands; each gradient in its operand's shape and
    dtype (dk and dv summed over the heads of each group). d_attn_mask: with mask_grad, the
    gradient of the additive attn_mask in its shape and dtype (this materialises a (B, H, Lq,
    Lk) float32 dS); otherwise None. configs: (dK/dV kernel's, dQ kernel's) explicit configs."""
    B, H, Hk, Lq, Lk, E, Ev = check_attention_operands(q, k, v, keep, mask_block, attn_mask)
    if tuple(grad_out.shape) != (B, H, Lq, Ev) or tuple(out.shape) != (B, H, Lq, Ev):
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and out {tuple(out.shape)} must be {(B, H, Lq, Ev)}")
    if tuple(lse.shape) != (B, H, Lq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape {(B, H, Lq)}, got {lse.dtype} {tuple(lse.shape)}")
    if mask_grad and (attn_mask is None or attn_mask.dtype == torch.bool):
        raise ValueError("mask_grad needs an additive (floating) attn_mask")
    if widened_for_interpreter(q):
        wide = [widen(t) for t in (grad_out, q, k, v, out)]
        grads = attention_backward(
            *wide, lse, keep, mask_block, drop_scale, scale, widen(attn_mask), is_causal, mask_grad, allow_tf32, configs
        )
        return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (q, k, v, attn_mask)))
    lse = lse.contiguous()
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    traceable(attention_delta_kernel)[(triton.cdiv(Lq, DELTA_ROWS), H, B)](
        out, grad_out, delta, H, Lq, Ev, *out.stride(), *grad_out.stride(), ROWS=DELTA_ROWS, BLOCK_EV=head_block(Ev)
    )
    dq = torch.empty((B, H, Lq, E), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Hk, Lk, E), device=q.device, dtype=q.dtype)
    dv = torch.empty((B, Hk, Lk, Ev), device=q.device, dtype=q.dtype)
    ds = torch.zeros((B, H, Lq, Lk), device=q.device, dtype=torch.float32) if mask_grad else None
    mask, mask_strides, mask_bool = mask_view(attn_mask, (B, H, Lq, Lk))
    keep = keep.to(torch.uint8)  # not a view: Inductor (torch 2.11) cannot view bool as uint8
    sizes = (H, H // Hk, Lq, Lk, E, Ev, size_key(Lq), size_key(Lk))
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, *keep.stride(), *grad_out.stride())
    factors = (float(scale) * LOG2E_VALUE, float(scale), float(drop_scale))
    meta = dict(
        HAS_MASK=attn_mask is not None,
        MASK_BOOL=mask_bool,
        IS_CAUSAL=bool(is_causal),
        MASK_BM=mask_block[0],
        MASK_BN=mask_block[1],
        BLOCK_E=head_block(E),
        BLOCK_EV=head_block(Ev),
        INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
    )
    operands = (q, k, v, mask, keep, grad_out, lse, delta)
    GRAD_KV.launch(
        lambda tiles: (triton.cdiv(Lk, tiles["BLOCK_N"]), Hk, B),
        configs[0],
        mask_block,
        q.element_size(),
        (*operands, dk, dv, ds, *sizes, *strides, *factors),
        dict(meta, STORE_DS=mask_grad),
    )
    GRAD_Q.launch(
        lambda tiles: (triton.cdiv(Lq, tiles["BLOCK_M"]), H, B),
        configs[1],
        mask_block,
        q.element_size(),
        (*operands, dq, *sizes, *strides, *factors),
        meta,
    )
    d_mask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    return dq, dk, dv, d_mask
