"""Flash-attention backward under block dropout.

With P = softmax(S), S = q kᵀ · scale + mask, s = 1 / (1 - p), M the tile table and
O = (P ⊙ M) V s, the gradients are
    dV = (P ⊙ M)ᵀ dO · s,    dP = (dO Vᵀ) ⊙ M · s,    D = rowsum(dO ⊙ O),
    dS = P ⊙ (dP − D),       dQ = dS K · scale,        dK = dSᵀ Q · scale,
and the additive mask's gradient is dS summed over its broadcast dims. P is recomputed per tile
from q, k and the forward's log-sum-exp. On a dropped tile dP = 0 and its P leaves dV alone: the
loops multiply both by zero there rather than branch (so Triton pipelines their loads), and
still add dS = −P·D into dQ and dK. Under the drop-keys policy a dropped tile has P = 0, so the
loops run over lists of the kept tiles and never visit it.

Three kernels: D per query row; dK and dV per key tile, looping over the query tiles of every
head of its group (grouped-query attention sums the group's gradients there, in a fixed order,
without atomics); dQ per query tile, looping over key tiles. As in the forward, each loop is
split into the tiles that straddle the diagonal (per-element causal test) and the rest, and the
operands are read through pointers or, opt-in, the tensor memory accelerator.
"""

import torch
import triton
import triton.language as tl

from .attention_grad_kv import attention_grad_kv_kernel
from .attention_grad_q import attention_grad_q_kernel
from .attention_launch import (
    AttentionKernel,
    check_attention_operands,
    head_block,
    kept_tile_lists,
    kernel_meta,
    mask_view,
    widen,
    widened_for_interpreter,
)
from .attention_tiling import LOG2E, load_tile
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


# Candidates (BLOCK_M, BLOCK_N, warps, stages) per padded head dim, best first by their kernel
# times on an H100 (as the forward's: bench/results/attention_configs.csv). dK/dV holds 128 keys
# at head dim 128, as the Triton tutorial's Hopper backward does; at 64, 64 keys with 4 warps were
# faster. All compile without register spills for sm_90 (Triton 3.7, bench/inspect_kernels.py;
# 4 warps at 128 keys spilled: 12 B and 684 B at head dim 64, 1.3 KB at 128). At 256 every dK/dV
# candidate spills.
GRAD_KV = AttentionKernel(
    attention_grad_kv_kernel,
    {
        64: [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2)],
        128: [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 2), (64, 64, 8, 3)],
        256: [(32, 64, 8, 2), (64, 64, 8, 3), (16, 64, 4, 2)],
    },
    resident="BLOCK_N",
    extra_key=("STORE_DS",),
)
GRAD_Q = AttentionKernel(
    attention_grad_q_kernel,
    {
        64: [(64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 2), (64, 16, 4, 2), (128, 64, 8, 2)],
        128: [(64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 16, 4, 2), (64, 32, 8, 2)],
        256: [(64, 32, 8, 2), (64, 64, 8, 2), (64, 16, 4, 2)],
    },
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
    drop_keys=False,
    tma=None,
    warp_specialize=None,
):
    """(dq, dk, dv, d_attn_mask) of attention_forward's out, given grad_out (B, H, Lq, Ev) = dO,
    the forward's out and lse and the same operands; each gradient in its operand's shape and
    dtype (dk and dv summed over the heads of each group). d_attn_mask: with mask_grad, the
    gradient of the additive attn_mask in its shape and dtype (this materialises a (B, H, Lq,
    Lk) float32 dS); otherwise None. configs: (dK/dV kernel's, dQ kernel's) explicit configs.
    drop_keys, tma, warp_specialize: as in attention_forward."""
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
            *wide, lse, keep, mask_block, drop_scale, scale, widen(attn_mask), is_causal, mask_grad, allow_tf32,
            configs, drop_keys, tma, warp_specialize,
        )  # fmt: skip
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
    mask, mask_strides = mask_view(attn_mask, (B, H, Lq, Lk))
    sizes = (H, H // Hk, Lq, Lk, E, Ev, size_key(Lq), size_key(Lk))
    factors = (float(scale) * LOG2E_VALUE, float(scale), float(drop_scale))
    meta = kernel_meta(
        (q, k, v, grad_out), mask_block, attn_mask, is_causal, drop_keys, allow_tf32, tma, warp_specialize
    )

    def operands(table, table_strides):
        """What both kernels take first, with this tile table (keep, or a drop-keys list)."""
        strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, *table_strides, *grad_out.stride())
        return (q, k, v, mask, table, grad_out, lse, delta), (*sizes, *strides, *factors)

    # keep is read as it is (bool loads as int1, uint8 as int8); drop-keys loops over kept tiles:
    # dK/dV by columns, its list's line and entry strides in the table's column and row slots.
    rows, columns = keep, keep
    if drop_keys:
        rows = kept_tile_lists(keep, mask_block, Lk, is_causal)
        columns = kept_tile_lists(keep, mask_block, Lk, is_causal, by_columns=True)
    column_strides = columns.stride()[:2] + columns.stride()[2:][::-1] if drop_keys else columns.stride()
    head, tail = operands(columns, column_strides)
    GRAD_KV.launch(
        lambda tiles: (triton.cdiv(Lk, tiles["BLOCK_N"]), Hk, B),
        configs[0],
        mask_block,
        q.element_size(),
        (*head, dk, dv, ds, *tail),
        dict(meta, STORE_DS=mask_grad),
    )
    head, tail = operands(rows, rows.stride())
    GRAD_Q.launch(
        lambda tiles: (triton.cdiv(Lq, tiles["BLOCK_M"]), H, B),
        configs[1],
        mask_block,
        q.element_size(),
        (*head, dq, *tail),
        meta,
    )
    d_mask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    return dq, dk, dv, d_mask
