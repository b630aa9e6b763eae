"""Dense references of block-dropout attention under an explicit tile mask.

For q (B, H, Lq, E), k (B, Hk, Lk, E), v (B, Hk, Lk, Ev), head h reading k/v head h // (H // Hk):
    S = q kᵀ · scale + attn_mask (-inf where a boolean mask is False or, under is_causal, where
    key j > query i), P = softmax(S) over every key, O = (P ⊙ M) v / (1 - p),
M the (B, H, Lq, Lk) element-wise expansion of the (B, H, cdiv(Lq, BM), cdiv(Lk, BN)) tile
table. Under the "dropkey" policy (drop_keys) the mask acts before the softmax instead:
    S' = S, -inf where M = 0, P' = softmax(S') over the kept keys, O = P' v (no rescale).
A query row that sees no key at all gets P = 0 there, so O = 0 and zero gradients: what
F.scaled_dot_product_attention returns for such rows (torch >= 2.5), not NaN.

dropout_attention_reference is the element-wise definition, differentiable by autograd, in any
floating dtype (float64 included). forward and backward are what the op runs on tensors the
kernels cannot take (CPU tensors without Triton's interpreter, fake tensors while torch.compile
traces): the same definition with the backward written out,
    dV = (P ⊙ M)ᵀ dO s, dP = (dO vᵀ) ⊙ M s, D = rowsum(dO ⊙ O), dS = P ⊙ (dP − D),
    dQ = dS k · scale, dK = dSᵀ q · scale, d(attn_mask) = dS summed over its broadcast dims,
with dK and dV summed over the query heads of each group. Under drop_keys, P is P' (zero on
dropped tiles, so dS is too), M = 1 and s = 1, and the log-sum-exp covers the kept keys only.
"""

import torch


def tile_elements(tiles, block, lq, lk):
    """The (B, H, lq, lk) bool element-wise mask of a (B, H, cdiv(lq, BM), cdiv(lk, BN)) tile
    table of block (BM, BN)."""

    # One-hot products rather than tiles repeated and cut to length: under torch.compile a cut
    # adds a guard on the length (a recompile per length), and Inductor's CPU code for an
    # index_select of the tiles failed its bounds check in T5's backward (torch 2.13).
    def one_hot(length, side, count):
        tile = torch.arange(length, device=tiles.device) // side
        return (tile[:, None] == torch.arange(count, device=tiles.device)).float()

    rows, cols = one_hot(lq, block[0], tiles.shape[2]), one_hot(lk, block[1], tiles.shape[3])
    return (rows @ tiles.float() @ cols.T) > 0.5


def _grouped(t, heads):
    """k or v (B, Hk, L, D) with each head repeated for the heads of its group: (B, heads, L, D)."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def _group_sum(t, kv_heads):
    """(B, H, L, D) gradients summed over the heads of each group: (B, kv_heads, L, D)."""
    b, h, length, d = t.shape
    return t.reshape(b, kv_heads, h // kv_heads, length, d).sum(2)


def scores(q, k, attn_mask, is_causal, scale):
    """S (B, H, Lq, Lk) in q's dtype: -inf where a key is hidden."""
    s = q @ _grouped(k, q.shape[1]).transpose(-1, -2) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    if is_causal:
        hidden = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(hidden, float("-inf"))
    return s


def probabilities(s):
    """softmax(s) over keys, 0 on rows that see no key (with zero gradients: the row's scores
    are replaced before the softmax, so no NaN reaches autograd)."""
    blind = (s == float("-inf")).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(blind, 0.0), dim=-1).masked_fill(blind, 0.0)


def _keys_dropped(s, tiles, block):
    """s with the dropped tiles' scores at -inf (DropKey: the softmax renormalises over the rest)."""
    return s.masked_fill(~tile_elements(tiles, block, s.shape[2], s.shape[3]), float("-inf"))


def _dropped(probs, tiles, block, p):
    keep = tile_elements(tiles, block, probs.shape[2], probs.shape[3])
    return probs * keep.to(probs.dtype) * (1.0 / (1.0 - p))


def _masked_scores(q, k, attn_mask, is_causal, scale, tiles, block, drop_keys):
    s = scores(q, k, attn_mask, is_causal, scale)
    return _keys_dropped(s, tiles, block) if drop_keys else s


def _attend(s, v, tiles, block, p, drop_keys):
    """O from the scores: P v under drop_keys (s holds the drop already), else (P ⊙ M) v / (1 - p)."""
    probs = probabilities(s)
    return (probs if drop_keys else _dropped(probs, tiles, block, p)) @ _grouped(v, s.shape[1])


def _check_heads(q, k, enable_gqa):
    if q.shape[-3] != k.shape[-3] and not enable_gqa:
        raise ValueError(
            f"q has {q.shape[-3]} heads and k {k.shape[-3]}: pass enable_gqa=True for grouped-query attention"
        )


def dropout_attention_reference(q, k, v, mask, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The element-wise definition under an AttentionMask (its tiles, block, p and policy), on
    4-D (B, H, L, E) or 3-D (H, L, E) inputs (then mask has batch 1), differentiable by autograd."""
    if q.dim() == 3:
        args = (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask, attn_mask, is_causal, scale, enable_gqa)
        return dropout_attention_reference(*args).squeeze(0)
    _check_heads(q, k, enable_gqa)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    drop_keys = mask.policy == "dropkey"
    s = _masked_scores(q, k, attn_mask, is_causal, scale, mask.tiles, mask.block, drop_keys)
    return _attend(s, v, mask.tiles, mask.block, mask.p, drop_keys)


def forward(q, k, v, attn_mask, tiles, block, p, is_causal, scale, drop_keys=False):
    """(out, lse) as the kernels return them: out in q's dtype, lse (B, H, Lq) float32, +inf on
    rows that see no key (under drop_keys: no kept key)."""
    s = _masked_scores(q, k, attn_mask, is_causal, scale, tiles, block, drop_keys)
    out = _attend(s, v, tiles, block, p, drop_keys)
    lse = torch.logsumexp(s.float(), dim=-1)
    return out, lse.masked_fill(lse == float("-inf"), float("inf"))


def backward(grad_out, q, k, v, out, lse, attn_mask, tiles, block, p, is_causal, scale, mask_grad, drop_keys=False):
    """(dq, dk, dv, d_attn_mask or None) from the saved log-sum-exp, as the kernels compute them."""
    s = _masked_scores(q, k, attn_mask, is_causal, scale, tiles, block, drop_keys)
    probs = torch.exp(s.float() - lse[..., None]).to(q.dtype)  # 0 on tiles whose keys were dropped
    keep = 1.0 if drop_keys else tile_elements(tiles, block, q.shape[2], k.shape[2]).to(q.dtype) * (1.0 / (1.0 - p))
    dv = (probs * keep).transpose(-1, -2) @ grad_out
    dp = (grad_out @ _grouped(v, q.shape[1]).transpose(-1, -2)) * keep
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
    ds32 = probs.float() * (dp.float() - delta)
    ds = ds32.to(q.dtype)
    dq = ds @ _grouped(k, q.shape[1]) * scale
    dk = ds.transpose(-1, -2) @ q * scale
    kv_heads = k.shape[1]
    d_mask = ds32.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    return dq, _group_sum(dk, kv_heads), _group_sum(dv, kv_heads), d_mask
