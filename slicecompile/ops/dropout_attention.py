"""dropout_attention: F.scaled_dot_product_attention with block dropout on its probabilities,
as torch.library custom ops.

O = (P ⊙ M) v / (1 - p) with P = softmax(q kᵀ · scale + attn_mask) over every key, kept or
dropped (dropout after the softmax, as SDPA defines it). M is constant on (BM, BN) tiles of each
(query, key) plane: each tile is kept whole, independently, with probability 1 - p, so E[O] is
SDPA's output without dropout. The tile table is (B, H, cdiv(Lq, BM), cdiv(Lk, BN)) bool, drawn
by torch.rand on the tensors' device (torch.manual_seed reproduces it; static shapes, no host
synchronisation) outside the ops, so the ops are deterministic and a recomputation
(activation checkpointing) draws or is handed the same table. Backward saves q, k, v, the
output, one log-sum-exp per query row and the tile table: nothing element-wise.

Two triton_ops: the forward (out, lse) and the backward (dq, dk, dv, d_attn_mask), traced by
torch.compile with no graph break. CUDA tensors run the flash-attention kernels of
slicecompile.kernels (the forward skips P·V on dropped tiles, the backward dV's and dP's GEMMs);
CPU tensors run the dense reference (attention_reference.py), or the kernels through Triton's
interpreter when TRITON_INTERPRET=1.

policy="dropkey" (DropKey, Li et al., CVPR 2023) drops keys before the softmax instead: a
dropped tile's scores are -inf, the softmax renormalises over the kept tiles, nothing is
rescaled, and the kernels skip every GEMM of a dropped tile. So E[O] is not SDPA's output. Each
query block-row keeps at least one tile all its queries can see (draw_attention_mask).

Rows that see no key (a mask hiding every key of a query) give zeros and zero gradients, as
SDPA does in torch >= 2.5. An additive attn_mask that requires grad (T5's position bias) gets
its gradient, dS summed over its broadcast dims; computing it materialises a (B, H, Lq, Lk)
float32 dS in backward, only in that case.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels import attention_backward, attention_forward
from . import attention_reference, dispatch
from .checks import SUPPORTED_DTYPES, autocast, check_block, check_p
from .dispatch import allow_tf32

DEFAULT_ATTENTION_BLOCK = (128, 128)
MAX_HEAD_DIM = 256
# "dropout": tiles of the probabilities dropped after the softmax, kept ones scaled by 1 / (1 - p);
# "dropkey": tiles of keys dropped before the softmax (renormalised over the rest, no rescale).
ATTENTION_POLICIES = ("dropout", "dropkey")


def check_attention_policy(policy):
    if policy not in ATTENTION_POLICIES:
        raise ValueError(f"unknown attention policy {policy!r}; known policies: {', '.join(ATTENTION_POLICIES)}")


@dataclass(frozen=True)
class AttentionMask:
    """tiles: (B, H, cdiv(Lq, BM), cdiv(Lk, BN)) bool, True where the (BM, BN) tile of a
    (query, key) plane is kept; shape: (B, H, Lq, Lk); block: (BM, BN); p: drop probability;
    policy: "dropout" (probabilities, after the softmax) or "dropkey" (keys, before it)."""

    tiles: torch.Tensor
    shape: tuple
    block: tuple
    p: float
    policy: str = "dropout"

    def __post_init__(self):
        check_attention_policy(self.policy)

    @property
    def scale(self):
        """What multiplies the kept probabilities: 1 / (1 - p), or 1 under "dropkey"."""
        return 1.0 if self.policy == "dropkey" else 1.0 / (1.0 - self.p)

    def elements(self):
        """(B, H, Lq, Lk) bool element-wise mask, for references and tests."""
        return attention_reference.tile_elements(self.tiles, self.block, *self.shape[2:])


def _check_size(name, value):
    if isinstance(value, torch.SymInt):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")


def draw_attention_mask(
    batch,
    heads,
    lq,
    lk,
    p,
    block=DEFAULT_ATTENTION_BLOCK,
    device=None,
    generator=None,
    policy="dropout",
    is_causal=False,
):
    """An AttentionMask over (batch, heads, lq, lk): every (BM, BN) tile kept independently with
    probability 1 - p, by one Bernoulli draw on device (one kernel on a GPU). Under
    policy="dropkey" the draw is one torch.rand, and a query block-row left with no kept tile that
    all its queries see (under is_causal) gets one back (_one_tile_per_row). Sizes may be symbolic
    (torch.compile)."""
    for name, value in (("batch", batch), ("heads", heads), ("lq", lq), ("lk", lk)):
        _check_size(name, value)
    check_p(p)
    block = check_block(block)
    check_attention_policy(policy)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    grid = (batch, heads, -(-lq // block[0]), -(-lk // block[1]))
    drawn = {} if generator is None else {"generator": generator}
    if policy == "dropkey":
        uniform = torch.rand(grid, device=device, **drawn)
        kept = _one_tile_per_row(uniform >= p, uniform, block, is_causal)
    else:  # one kernel, and the table the attention kernels read as it is
        kept = torch.empty(grid, dtype=torch.bool, device=device).bernoulli_(1.0 - p, **drawn)
    return AttentionMask(kept, (batch, heads, lq, lk), block, float(p), policy)


def _one_tile_per_row(kept, uniform, block, is_causal):
    """DropKey's softmax needs a key in every row. A block-row none of whose kept tiles its first
    query (so every query of the block) sees keeps one more: under is_causal its diagonal tile,
    the one holding key i·BM (the last tile when i·BM >= Lk), which every query of the block sees
    under top-left causal masking; otherwise the tile of its largest draw. Rows that have such a
    tile are left as drawn, so p is honoured as closely as the rule allows."""
    rows, cols = kept.shape[-2:]
    column = torch.arange(cols, device=kept.device)
    if is_causal:
        diagonal = (torch.arange(rows, device=kept.device) * block[0] // block[1]).clamp(max=cols - 1)[:, None]
        chosen, seen = column == diagonal, column <= diagonal
    elif statically_known_true(cols == 0):
        return kept
    else:
        chosen, seen = uniform == uniform.amax(-1, keepdim=True), True
    blind = ~(kept & seen).any(-1, keepdim=True)
    return kept | (chosen & blind)


@torch.library.triton_op("slicecompile::block_dropout_attention", mutates_args=())
def block_dropout_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    tiles: Tensor,
    block_m: int,
    block_n: int,
    p: float,
    is_causal: bool,
    scale: float,
    drop_keys: bool = False,
) -> tuple[Tensor, Tensor]:
    """(out (B, H, Lq, Ev), lse (B, H, Lq) float32) for 4-D q, k, v under the tile table;
    drop_keys: the "dropkey" policy."""
    block, drop_scale = (block_m, block_n), _drop_scale(p, drop_keys)
    if not dispatch.use_kernels(q):
        return attention_reference.forward(q, k, v, attn_mask, tiles, block, p, is_causal, scale, drop_keys)
    args = (q, k, v, tiles, block, drop_scale, scale, attn_mask, is_causal, allow_tf32())
    return attention_forward(*args, drop_keys=drop_keys)


@torch.library.triton_op("slicecompile::block_dropout_attention_backward", mutates_args=())
def block_dropout_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Tensor | None,
    tiles: Tensor,
    block_m: int,
    block_n: int,
    p: float,
    is_causal: bool,
    scale: float,
    mask_grad: bool,
    drop_keys: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_attn_mask); d_attn_mask is empty unless mask_grad."""
    block, drop_scale = (block_m, block_n), _drop_scale(p, drop_keys)
    if not dispatch.use_kernels(q):
        args = (grad_out, q, k, v, out, lse, attn_mask, tiles, block, p, is_causal, scale, mask_grad, drop_keys)
        dq, dk, dv, d_mask = attention_reference.backward(*args)
    else:
        args = (grad_out, q, k, v, out, lse, tiles, block, drop_scale, scale, attn_mask, is_causal, mask_grad)
        dq, dk, dv, d_mask = attention_backward(*args, allow_tf32=allow_tf32(), drop_keys=drop_keys)
    return dq, dk, dv, q.new_empty(0) if d_mask is None else d_mask


def _drop_scale(p, drop_keys):
    """What multiplies the kept probabilities: none under drop_keys (the softmax saw the drop)."""
    return 1.0 if drop_keys else 1.0 / (1.0 - p)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, tiles, block_m, block_n, p, is_causal, scale, drop_keys = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, tiles)
    ctx.mask_args = (block_m, block_n, p, is_causal, scale)
    ctx.drop_keys = drop_keys
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, attn_mask, tiles = ctx.saved_tensors
    mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
    args = (grad_out, q, k, v, out, lse, attn_mask, tiles, *ctx.mask_args, mask_grad, ctx.drop_keys)
    dq, dk, dv, d_mask = block_dropout_attention_backward(*args)
    return dq, dk, dv, d_mask if mask_grad else None, None, None, None, None, None, None, None


block_dropout_attention.register_autograd(_backward, setup_context=_setup_context)


def dropout_attention(
    q,
    k,
    v,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    block=DEFAULT_ATTENTION_BLOCK,
    training=True,
    policy="dropout",
):
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
    enable_gqa) with block dropout: whole (BM, BN) = block tiles of each (query, key) plane of
    the probabilities kept or dropped, kept ones scaled by 1 / (1 - dropout_p); or under
    policy="dropkey", of the keys before the softmax, with no rescale. q (B, H, Lq, E),
    k (B, Hk, Lk, E), v (B, Hk, Lk, Ev), or the same without B (then the mask has batch 1).
    training=False or dropout_p = 0 is exactly SDPA; so is an empty input."""
    check_p(dropout_p)
    block = check_block(block)
    check_attention_policy(policy)
    q, k, v, attn_mask = _check_inputs(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    if not training or dropout_p == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
    plane = (q.shape[0] if q.dim() == 4 else 1, q.shape[-3], q.shape[-2], k.shape[-2])
    mask = draw_attention_mask(*plane, dropout_p, block, device=q.device, policy=policy, is_causal=is_causal)
    return _under_mask(q, k, v, mask, attn_mask, is_causal, scale, enable_gqa)


def dropout_attention_with_mask(q, k, v, mask, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """dropout_attention under an explicit AttentionMask (from draw_attention_mask over (B, H,
    Lq, Lk); B = 1 for 3-D inputs), under the mask's policy."""
    q, k, v, attn_mask = _check_inputs(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    if not isinstance(mask, AttentionMask):
        raise TypeError(f"mask must be an AttentionMask, got {type(mask).__name__}")
    plane = (q.shape[0] if q.dim() == 4 else 1, q.shape[-3], q.shape[-2], k.shape[-2])
    if tuple(mask.shape) != plane:
        raise ValueError(f"the mask covers {tuple(mask.shape)} but the attention is over (B, H, Lq, Lk) = {plane}")
    if mask.tiles.device != q.device:
        raise ValueError(f"the mask is on {mask.tiles.device} but q is on {q.device}")
    return _under_mask(q, k, v, mask, attn_mask, is_causal, scale, enable_gqa)


def _under_mask(q, k, v, mask, attn_mask, is_causal, scale, enable_gqa):
    if any(statically_known_true(t.numel() == 0) for t in (q, k, v)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims {q.shape[-1]} and {v.shape[-1]} must be at most {MAX_HEAD_DIM} under dropout")
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (q, k, v, attn_mask, mask.tiles, *mask.block, mask.p, bool(is_causal), scale, mask.policy == "dropkey")
    out, _ = block_dropout_attention(*args)
    return out.squeeze(0) if squeeze else out


def _check_inputs(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    """SDPA's layout, after autocast: returns (q, k, v, attn_mask) as the op computes them."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        raise TypeError(f"is_causal and enable_gqa must be bools, got {is_causal!r} and {enable_gqa!r}")
    q, k, v, attn_mask = autocast((q, k, v, attn_mask))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if len({q.device, k.device, v.device} | ({attn_mask.device} if attn_mask is not None else set())) > 1:
        raise ValueError("q, k, v and attn_mask must be on one device")
    _check_shapes(q, k, v, enable_gqa)
    if attn_mask is not None:
        _check_attn_mask(attn_mask, q, k)
    return q, k, v, attn_mask


def _check_shapes(q, k, v, enable_gqa):
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        shapes = ", ".join(str(tuple(t.shape)) for t in (q, k, v))
        raise ValueError(f"q, k and v must all be 4-D (B, H, L, E) or all 3-D (H, L, E), got {shapes}")
    if q.dim() == 4 and not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"q, k and v must share a batch size, got {q.shape[0]}, {k.shape[0]} and {v.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q's head dim {q.shape[-1]} differs from k's {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2] or k.shape[-3] != v.shape[-3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share heads and length")
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if heads != kv_heads and not enable_gqa:
        raise ValueError(f"q has {heads} heads and k {kv_heads}: pass enable_gqa=True for grouped-query attention")
    if kv_heads == 0 and heads != 0 or kv_heads != 0 and heads % kv_heads:
        raise ValueError(f"k's {kv_heads} heads must divide q's {heads}")


def _check_attn_mask(attn_mask, q, k):
    if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
        raise TypeError(f"attn_mask must be bool, float32 or q's dtype {q.dtype}, got {attn_mask.dtype}")
    scores = (*q.shape[:-1], k.shape[-2])
    fits = attn_mask.dim() <= len(scores) and all(
        size == 1 or size == target for size, target in zip(reversed(attn_mask.shape), reversed(scores))
    )
    if not fits:
        raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to the scores' shape {scores}")
