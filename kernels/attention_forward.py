"""Flash-attention forward under block dropout.

O = (P ⊙ M) V / (1 - p) with P = softmax(q kᵀ · scale + mask): an online softmax over key
tiles (no (Lq, Lk) matrix in memory), the normaliser covering every key, kept or dropped. M is
the tile table: each semantic (MASK_BM, MASK_BN) tile of a (query, key) plane is kept or
dropped whole. A dropped tile still needs q kᵀ (for the normaliser) but skips loading V and the
P V product. Saves the log-sum-exp of each query row (natural units) for the backward pass.
The key loop visits every tile and branches on the tile table around V (the one branch in the
loop): a compact list of kept tiles, as the masked GEMMs use, would skip the normaliser's tiles.

Pointer loads only (no tensor-memory-accelerator path yet): any GPU, and Triton's interpreter.
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
from .attention_tiling import LN2, LOG2E, load_tile, scores, store_tile, tile_kept
from .runtime import size_key


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
    MASK_BM: tl.constexpr,
    MASK_BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """q: (B, H, LQ, E), k: (B, H // GROUP, LK, E), v: (B, H // GROUP, LK, EV), mask: the
    attention mask seen as (B, H, LQ, LK) (bool as uint8, or additive; stride 0 on broadcast
    dims) if HAS_MASK, keep: (B, H, cdiv(LQ, MASK_BM), cdiv(LK, MASK_BN)) uint8 tile table,
    out: (B, H, LQ, EV), lse: (B, H, LQ) float32 contiguous.

    Program (i, h, b) computes query rows [i * BLOCK_M, (i + 1) * BLOCK_M) of head h,
    which reads k and v head h // GROUP: out = drop_scale · Σ_kept-tiles P V, lse = log Σ_keys
    exp(scores). qk_scale = scale · log2(e). Rows that see no key (all masked) get out = 0 and
    lse = +inf, so that the backward's recomputed P is 0 there. Under IS_CAUSAL the key tiles
    past the diagonal are never visited. BLOCK_M divides MASK_BM and BLOCK_N divides MASK_BN;
    BLOCK_E and BLOCK_EV are E and EV padded to powers of two."""
    tl.static_assert(MASK_BM % BLOCK_M == 0 and MASK_BN % BLOCK_N == 0, "tiles must divide the mask's block")
    # Inductor passes Python floats to a user kernel as float64 (torch 2.11, H200): in float32 they
    # keep the online softmax's carried values, and the dot accumulator, float32.
    qk_scale, drop_scale = tl.cast(qk_scale, tl.float32), tl.cast(drop_scale, tl.float32)
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    q = load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_e, LQ, E, stride_qm, stride_qe)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh if HAS_MASK else mask_ptr
    keep_base = keep_ptr + b * stride_keep_b + h * stride_keep_h

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), dtype=tl.float32)
    hi = tl.minimum(LK, start_m + BLOCK_M) if IS_CAUSAL else LK
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = load_tile(k_base, offs_e, offs_n, E, LK, stride_ke, stride_kn)
        s = scores(
            q, k_t, offs_m, offs_n, LQ, LK, qk_scale, mask_base, stride_mm, stride_mn,
            HAS_MASK, MASK_BOOL, IS_CAUSAL, INPUT_PRECISION,
        )  # fmt: skip
        new_max = tl.maximum(row_max, tl.max(s, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that have seen no key yet
        p = tl.math.exp2(s - shift[:, None])
        alpha = tl.math.exp2(row_max - shift)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if tile_kept(keep_base, start_m, start_n, stride_keep_m, stride_keep_n, MASK_BM, MASK_BN):
            v = load_tile(v_base, offs_n, offs_ev, LK, EV, stride_vn, stride_ve)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        row_max = new_max

    seen = row_sum > 0
    out = acc * (drop_scale / tl.where(seen, row_sum, 1.0))[:, None]
    out_base = out_ptr + b * stride_ob + h * stride_oh
    store_tile(out_base, out, offs_m, offs_ev, LQ, EV, stride_om, stride_oe)
    lse = tl.where(seen, (row_max + tl.math.log2(tl.where(seen, row_sum, 1.0))) * LN2, float("inf"))
    tl.store(lse_ptr + (b * H + h) * LQ + offs_m, lse, mask=offs_m < LQ)


def _configs():
    """Candidates (BLOCK_M, BLOCK_N, warps, stages) after the Triton tutorial's fused attention;
    not yet tuned on a GPU here. fit() shrinks them to the mask's block and the head dims."""
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2)]
    ]


FORWARD = AttentionKernel(attention_forward_kernel, _configs(), resident="BLOCK_M")
LOG2E_VALUE = float(LOG2E.value)


def attention_forward(
    q, k, v, keep, mask_block, drop_scale, scale, attn_mask=None, is_causal=False, allow_tf32=False, config=None
):
    """(out, lse) of block-dropout attention: out (B, H, Lq, Ev) in q's dtype,
    out = (softmax(q kᵀ · scale + mask) ⊙ M) v · drop_scale, M the tile table keep (B, H,
    cdiv(Lq, BM), cdiv(Lk, BN)) (True or 1 = kept) of semantic blocks mask_block = (BM, BN);
    lse (B, H, Lq) float32, each query row's log-sum-exp (+inf where no key is seen).

    q (B, H, Lq, E), k (B, Hk, Lk, E), v (B, Hk, Lk, Ev), any strides; head h reads k/v head
    h // (H // Hk). attn_mask: bool (True = attend) or additive, broadcastable to (B, H, Lq, Lk),
    read in place. is_causal: query i sees keys j <= i (top-left aligned). config: kernel tiles
    and launch options (dict(BLOCK_M=, BLOCK_N=, num_warps=, num_stages=)) instead of autotuning.
    """
    B, H, Hk, Lq, Lk, E, Ev = check_attention_operands(q, k, v, keep, mask_block, attn_mask)
    if widened_for_interpreter(q):
        args = (widen(q), widen(k), widen(v), keep, mask_block, drop_scale, scale, widen(attn_mask))
        out, lse = attention_forward(*args, is_causal=is_causal, allow_tf32=allow_tf32, config=config)
        return out.to(q.dtype), lse
    out = torch.empty((B, H, Lq, Ev), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    mask, mask_strides, mask_bool = mask_view(attn_mask, (B, H, Lq, Lk))
    keep = keep.to(torch.uint8)  # not a view: Inductor (torch 2.11) cannot view bool as uint8
    args = (
        q, k, v, mask, keep, out, lse, H, H // Hk, Lq, Lk, E, Ev, size_key(Lq), size_key(Lk),
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *keep.stride(), *out.stride(),
        float(scale) * LOG2E_VALUE, float(drop_scale),
    )  # fmt: skip
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
    grid = lambda tiles: (triton.cdiv(Lq, tiles["BLOCK_M"]), H, B)  # noqa: E731
    FORWARD.launch(grid, config, mask_block, q.element_size(), args, meta)
    return out, lse
