"""The block-dropout attention kernels (forward and backward launchers) against the float64
dense reference under the same tile mask."""

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
from hypothesis import given
from hypothesis import strategies as st

from slicecompile import draw_attention_mask, dropout_attention_reference
from slicecompile.kernels import attention_backward, attention_forward
from slicecompile.kernels.attention_launch import kept_tile_lists
from slicecompile.ops import attention_reference

from conftest import DEVICE
from tolerance import assert_close

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
# (heads, kv heads): plain, one kv head for two, and a group of two per kv head.
head_groups = st.sampled_from([(1, 1), (2, 2), (2, 1), (4, 2)])
# attn_mask shapes (as templates over B, H, Lq, Lk): full, per head, per query row, per key.
MASK_SHAPES = {"full": "BHQK", "plane": "QK", "heads": "1HQK", "rows": "Q1", "keys": "B11K"}
MASK_KINDS = ["none", "bool", "additive", "additive with grad"]


def attn_mask_of(kind, shape, B, H, Lq, Lk, dtype):
    """An attention mask of kind over MASK_SHAPES[shape] (bool: about 1 key in 4 hidden, so
    broadcast shapes can hide whole rows; additive: normal values in q's dtype), or None."""
    if kind == "none":
        return None
    sizes = [dict(B=B, H=H, Q=Lq, K=Lk, **{"1": 1})[c] for c in MASK_SHAPES[shape]]
    if kind == "bool":
        return torch.rand(sizes, device=DEVICE) > 0.25
    return torch.randn(sizes, device=DEVICE).to(dtype).requires_grad_(kind == "additive with grad")


def run_kernels(q, k, v, mask, attn_mask, is_causal, grad, scale=None, configs=(None, None, None), tma=None):
    """[out, dq, dk, dv(, d_attn_mask)] from the launchers (d_attn_mask when attn_mask requires grad),
    under mask's policy; tma: the launchers' TMA switch (None: the environment's choice)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask_grad = attn_mask is not None and attn_mask.requires_grad
    detached = None if attn_mask is None else attn_mask.detach()
    common = (mask.tiles, mask.block, mask.scale, scale)
    paths = dict(drop_keys=mask.policy == "dropkey", tma=tma)
    out, lse = attention_forward(q, k, v, *common, detached, is_causal, config=configs[0], **paths)
    grads = attention_backward(
        grad, q, k, v, out, lse, *common, detached, is_causal, mask_grad=mask_grad, configs=configs[1:], **paths
    )
    return [out, *grads[:3]] + ([grads[3]] if mask_grad else [])


def run_reference(q, k, v, mask, attn_mask, is_causal, grad, dtype, scale=None):
    """[out, dq, dk, dv(, d_attn_mask)] of the dense reference, operands in dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if attn_mask is not None and attn_mask.requires_grad:
        attn_mask = attn_mask.detach().to(dtype).requires_grad_()
        leaves.append(attn_mask)
    elif attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(dtype)
    out = dropout_attention_reference(*leaves[:3], mask, attn_mask, is_causal, scale, enable_gqa=True)
    out.backward(grad.to(dtype))
    return [out] + [t.grad for t in leaves]


def magnitudes(q, k, v, mask, attn_mask, is_causal, grad, scale=None):
    """[(magnitude, terms)] for out, dq, dk, dv and d_attn_mask (tolerance.assert_close): each
    result's float64 sum of absolute terms, and as terms its own reduction's length plus what
    reaches it through P: the scores' rounding (E · |q||k| · scale units) and the normaliser's
    (Lk units). dS = P (dP − D) is bounded by P (|dP| + |D|): the two cancel, their rounding does
    not. In 16-bit dtypes the second GEMM of each result takes a rounded intermediate (P, dS, and
    the stored O that D is computed from, as FlashAttention does): one rounding in the dtype,
    eps(dtype) / eps(float32) more terms."""
    rounding = torch.finfo(q.dtype).eps / torch.finfo(torch.float32).eps
    q, k, v, grad = (t.detach().double() for t in (q, k, v, grad))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.detach().double()
    (_, _, Lq, E), (_, Hk, Lk, Ev), group = q.shape, v.shape, q.shape[1] // v.shape[1]
    k_all, v_all = k.abs().repeat_interleave(group, 1), v.abs().repeat_interleave(group, 1)
    s = attention_reference.scores(q, k, attn_mask, is_causal, scale)
    if mask.policy == "dropkey":
        s = s.masked_fill(~mask.elements(), float("-inf"))
    kept = attention_reference.probabilities(s)
    kept = kept * mask.elements() * mask.scale
    probs = kept / mask.scale
    out = kept @ v_all
    ds = probs * (
        (grad.abs() @ v_all.transpose(-1, -2)) * mask.elements() * mask.scale + (grad.abs() * out).sum(-1, True)
    )
    per_group = lambda t: t.reshape(t.shape[0], Hk, group, *t.shape[2:]).sum(2)  # noqa: E731
    spread = Lk + E * (q.abs() @ k_all.transpose(-1, -2) * scale).max().item() + rounding
    result = [
        (out, spread + Lk),
        (ds @ k_all * scale, spread + Lk + Ev),
        (per_group(ds.transpose(-1, -2) @ q.abs() * scale), spread + group * Lq + Ev),
        (per_group(kept.transpose(-1, -2) @ grad.abs()), spread + group * Lq),
    ]
    if attn_mask is not None:
        result.append((ds.sum_to_size(attn_mask.shape), spread + Ev + ds.numel() / attn_mask.numel()))
    return result


def check_kernels(q, k, v, mask, attn_mask, is_causal, scale=None, configs=(None, None, None), tma=None):
    grad = torch.randn(*q.shape[:3], v.shape[-1], device=DEVICE).to(q.dtype)
    actual = run_kernels(q, k, v, mask, attn_mask, is_causal, grad, scale, configs, tma)
    wide = run_reference(q, k, v, mask, attn_mask, is_causal, grad, torch.float64, scale)
    same = run_reference(q, k, v, mask, attn_mask, is_causal, grad, q.dtype, scale)
    bounds = magnitudes(q, k, v, mask, attn_mask, is_causal, grad, scale)
    for what, a, w, s, (magnitude, terms) in zip(["out", "dq", "dk", "dv", "d_attn_mask"], actual, wide, same, bounds):
        assert_close(a, w, s, what, magnitude, terms)
    return actual


def qkv(B, H, Hk, Lq, Lk, E, Ev, dtype):
    return (
        torch.randn(B, H, Lq, E, device=DEVICE).to(dtype),
        torch.randn(B, Hk, Lk, E, device=DEVICE).to(dtype),
        torch.randn(B, Hk, Lk, Ev, device=DEVICE).to(dtype),
    )


@given(
    B=st.integers(1, 2),
    heads=head_groups,
    Lq=st.integers(1, 72),
    Lk=st.integers(1, 72),
    head_dims=st.sampled_from([(16, 16), (32, 32), (64, 64), (24, 40)]),
    is_causal=st.booleans(),
    mask_kind=st.sampled_from(MASK_KINDS),
    mask_shape=st.sampled_from(list(MASK_SHAPES)),
    dtype=dtypes,
    p=st.sampled_from([0.0, 0.3, 0.7]),
    block=st.tuples(st.sampled_from([16, 32, 64]), st.sampled_from([32, 64])),
    policy=st.sampled_from(["dropout", "dropkey"]),
    tma=st.sampled_from([None, True]),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernels_match_reference(
    B, heads, Lq, Lk, head_dims, is_causal, mask_kind, mask_shape, dtype, p, block, policy, tma, seed
):
    """Forward and every gradient (the additive mask's too) on ragged lengths, head dims 16-64
    (E != Ev included), causal or not, both mask kinds, grouped-query attention, every dtype, both
    policies, through pointers and through tensor-memory-accelerator descriptors (the interpreter
    runs both; on a GPU without the accelerator tma=True is skipped)."""
    tma = tma if DEVICE == "cpu" else None  # on a GPU the drawn blocks are below the TMA path's 128
    torch.manual_seed(seed)
    (H, Hk), (E, Ev) = heads, head_dims
    q, k, v = qkv(B, H, Hk, Lq, Lk, E, Ev, dtype)
    attn_mask = attn_mask_of(mask_kind, mask_shape, B, H, Lq, Lk, dtype)
    mask = draw_attention_mask(B, H, Lq, Lk, p, block, device=DEVICE, policy=policy, is_causal=is_causal)
    check_kernels(q, k, v, mask, attn_mask, is_causal, tma=tma)


@pytest.mark.parametrize("E, Ev", [(128, 128), (256, 256), (128, 64)])
def test_large_head_dims(E, Ev):
    torch.manual_seed(0)
    q, k, v = qkv(1, 2, 1, 40, 33, E, Ev, torch.float16)
    check_kernels(q, k, v, draw_attention_mask(1, 2, 40, 33, 0.4, (64, 64), device=DEVICE), None, True)


def test_kernel_tiles_look_up_the_semantic_tile_they_lie_in():
    """Kernel tiles of (16, 16) under a (64, 32) semantic block drop exactly the elements that
    tiles of the block's own size drop: the results agree with the reference under that mask."""
    torch.manual_seed(1)
    q, k, v = qkv(1, 1, 1, 80, 72, 32, 32, torch.float32)
    mask = draw_attention_mask(1, 1, 80, 72, 0.5, (64, 32), device=DEVICE)
    small = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    bool_mask = torch.rand(80, 72, device=DEVICE) > 0.2
    torch.manual_seed(2)  # the same output gradient for both
    small_tiles = check_kernels(q, k, v, mask, bool_mask, False, configs=(small, small, small))
    torch.manual_seed(2)
    block_tiles = check_kernels(q, k, v, mask, bool_mask, False)
    for a, b in zip(small_tiles, block_tiles):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("policy", ["dropout", "dropkey"])
@pytest.mark.parametrize("Lq, Lk", [(80, 56), (40, 96)])
def test_causal_loops_split_at_the_diagonal(Lq, Lk, policy):
    """Kernel tiles of (16, 16) under a (32, 64) semantic block: the key loops' split between tiles
    wholly left of the diagonal (no per-element test) and the diagonal and ragged ones falls inside
    semantic tiles and past the shorter length, through pointers and descriptors alike."""
    torch.manual_seed(4)
    q, k, v = qkv(1, 2, 1, Lq, Lk, 32, 16, torch.float32)
    mask = draw_attention_mask(1, 2, Lq, Lk, 0.4, (32, 64), device=DEVICE, policy=policy, is_causal=True)
    small = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    for tma in (False, True):
        torch.manual_seed(5)
        check_kernels(q, k, v, mask, None, True, configs=(small, small, small), tma=tma and DEVICE == "cpu" or None)


@pytest.mark.parametrize("policy", ["dropout", "dropkey"])
def test_dropped_tiles_under_each_policy(policy):
    """A key tile every query tile drops, with NaN in its values (and, under drop-keys, its keys).
    Drop-keys never reads it: the results are those without the NaN. Dropped weights multiply
    its values by zero, as dense dropout's (P ⊙ M) V does, so the NaN reaches the same results
    as in the reference (the kernels keep V's loads unconditional, which lets them pipeline)."""
    torch.manual_seed(6)
    q, k, v = qkv(1, 1, 1, 64, 96, 16, 16, torch.float32)
    mask = draw_attention_mask(1, 1, 64, 96, 0.0, (32, 32), device=DEVICE, policy=policy)
    tiles = mask.tiles.clone()
    tiles[..., 1] = False
    mask = dataclasses.replace(mask, tiles=tiles)
    v[:, :, 32:64] = float("nan")
    if policy == "dropkey":
        k[:, :, 32:64] = float("nan")
    grad = torch.randn(1, 1, 64, 16, device=DEVICE)
    results = run_kernels(q, k, v, mask, None, False, grad)
    if policy == "dropkey":
        k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    expected = run_reference(q, k, v, mask, None, False, grad, torch.float64)
    for what, actual, wide in zip(["out", "dq", "dk", "dv"], results, expected):
        assert torch.isfinite(actual).all() or policy == "dropout", what
        torch.testing.assert_close(actual.double(), wide, rtol=1e-4, atol=1e-5, equal_nan=True, msg=what)


def test_kernel_paths_reject_what_they_cannot_read():
    q, k, v = qkv(1, 2, 2, 32, 32, 16, 16, torch.float32)
    mask = draw_attention_mask(1, 2, 32, 32, 0.5, (32, 32), device=DEVICE)
    fwd = lambda *a, **kw: attention_forward(*a, mask.tiles, mask.block, 2.0, 0.25, **kw)  # noqa: E731
    odd = torch.randn(1, 2, 32, 17, device=DEVICE)[..., :16]  # rows of 17 floats: not 16-byte aligned
    with pytest.raises(ValueError, match="tensor memory accelerator"):
        fwd(odd, k, v, tma=True)
    with pytest.raises(ValueError, match="needs the TMA path"):
        fwd(q, k, v, tma=False, warp_specialize=True)
    out, _ = fwd(odd, k, v)  # left to the environment's choice: pointers, whatever it says
    torch.testing.assert_close(out, fwd(odd.contiguous(), k, v, tma=False)[0])


def test_kernel_tiles_must_divide_the_semantic_block():
    q, k, v = qkv(1, 1, 1, 32, 32, 16, 16, torch.float32)
    mask = draw_attention_mask(1, 1, 32, 32, 0.5, (32, 32), device=DEVICE)
    for tiles in [(64, 32), (32, 8)]:
        config = dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1], num_warps=4, num_stages=1)
        with pytest.raises(ValueError, match="must be >= 16 and divide the mask's block"):
            attention_forward(q, k, v, mask.tiles, mask.block, mask.scale, 0.25, config=config)


def test_normaliser_covers_dropped_tiles():
    """With p = 0.9 and one kept tile per plane, the kept tile's values are the full softmax's P
    (over every key, dropped or not) times 1 / (1 - p); everything else is zero. v = identity
    makes the output P ⊙ M / (1 - p) itself."""
    torch.manual_seed(2)
    Lq, Lk, block = 48, 64, (16, 32)
    q, k = torch.randn(1, 1, Lq, 16, device=DEVICE), torch.randn(1, 1, Lk, 16, device=DEVICE)
    v = torch.eye(Lk, device=DEVICE)[None, None]
    mask = draw_attention_mask(1, 1, Lq, Lk, 0.9, block, device=DEVICE)
    tiles = torch.zeros_like(mask.tiles)
    tiles[0, 0, 1, 1] = True
    mask = dataclasses.replace(mask, tiles=tiles)
    out, lse = attention_forward(q, k, v, mask.tiles, mask.block, mask.scale, 0.25)
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.25, dim=-1)
    expected = probs * mask.elements() / (1 - 0.9)
    assert_close(out, expected, (torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) * mask.elements()) * 10, "P / (1-p)")
    assert (out[~mask.elements()] == 0).all() and (out[0, 0, 16:32, 32:64] > 0).all()
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, dim=-1))


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_rows_that_see_no_key_give_zeros_as_sdpa_does(kind):
    torch.manual_seed(3)
    q, k, v = qkv(1, 2, 2, 40, 24, 16, 16, torch.float32)
    hidden = torch.zeros(40, 1, dtype=torch.bool, device=DEVICE)
    hidden[[0, 17, 39]] = True
    attn_mask = ~hidden.expand(40, 24) if kind == "bool" else torch.zeros(40, 24).masked_fill(hidden, float("-inf"))
    mask = draw_attention_mask(1, 2, 40, 24, 0.0, (32, 32), device=DEVICE)
    out, lse = attention_forward(q, k, v, mask.tiles, mask.block, mask.scale, 0.25, attn_mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask, scale=0.25))
    assert (out[:, :, [0, 17, 39]] == 0).all() and (lse[:, :, [0, 17, 39]] == math.inf).all()
    grads = attention_backward(torch.randn_like(out), q, k, v, out, lse, mask.tiles, mask.block, 1.0, 0.25, attn_mask)
    assert (grads[0][:, :, [0, 17, 39]] == 0).all() and all(torch.isfinite(g).all() for g in grads[:3])


def test_launchers_reject_bad_operands():
    q, k, v = qkv(1, 2, 2, 32, 32, 16, 16, torch.float32)
    mask = draw_attention_mask(1, 2, 32, 32, 0.5, (32, 32), device=DEVICE)
    fwd = lambda *a, **kw: attention_forward(*a, mask.block, 2.0, 0.25, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="must be 4-D"):
        fwd(q[0], k, v, mask.tiles)
    with pytest.raises(TypeError, match="share a dtype"):
        fwd(q, k.half(), v, mask.tiles)
    with pytest.raises(TypeError, match="supported"):
        fwd(q.double(), k.double(), v.double(), mask.tiles)
    with pytest.raises(ValueError, match="do not fit together"):
        fwd(q, k[..., :8], v, mask.tiles)
    with pytest.raises(ValueError, match="heads must divide"):
        fwd(torch.randn(1, 3, 32, 16, device=DEVICE), k, v, mask.tiles)
    with pytest.raises(ValueError, match="tile table of shape"):
        fwd(q, k, v, mask.tiles[:, :, :, :0])
    with pytest.raises(ValueError, match="does not broadcast"):
        fwd(q, k, v, mask.tiles, attn_mask=torch.zeros(31, 32, device=DEVICE))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        fwd(q, k, v, mask.tiles, attn_mask=torch.zeros(32, 32, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="at most 256"):
        fwd(*qkv(1, 2, 2, 32, 32, 264, 16, torch.float32), mask.tiles)
    out, lse = fwd(q, k, v, mask.tiles)
    with pytest.raises(ValueError, match="lse must be float32"):
        attention_backward(out, q, k, v, out, lse.half(), mask.tiles, mask.block, 2.0, 0.25)
    with pytest.raises(ValueError, match="mask_grad needs an additive"):
        attention_backward(out, q, k, v, out, lse, mask.tiles, mask.block, 2.0, 0.25, mask_grad=True)


def test_configs_fit_the_semantic_block_and_the_head_dims():
    """Autotuning candidates shrink to divide the mask's block, their resident rows to 64 KiB and
    their streamed rows to half the shared-memory budget a stage."""
    from slicecompile.kernels.attention_forward import FORWARD

    configs = [triton.Config(dict(BLOCK_M=128, BLOCK_N=128), num_warps=8, num_stages=3)]
    tiles = lambda *args: [c.kwargs for c in FORWARD.fit(configs, *args)]  # noqa: E731
    assert tiles(2, 64, 64, (32, 64)) == [dict(BLOCK_M=32, BLOCK_N=64)]
    assert tiles(2, 128, 128, (128, 128)) == [dict(BLOCK_M=128, BLOCK_N=128)]
    assert tiles(4, 128, 128, (128, 128)) == [dict(BLOCK_M=64, BLOCK_N=64)]
    assert tiles(2, 256, 256, (128, 128)) == [dict(BLOCK_M=64, BLOCK_N=64)]


_TUNE = """
import torch
from slicecompile import draw_attention_mask, dropout_attention_reference, dropout_attention_with_mask
from slicecompile.kernels import autotuners
for L, E in ((512, 64), (300, 128), (256, 256)):
    q, k, v = (torch.randn(2, 4, L, E, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = draw_attention_mask(2, 4, L, L, 0.3, (128, 128), device="cuda")
    y = dropout_attention_with_mask(q, k, v, mask, is_causal=True)
    y.backward(torch.ones_like(y))
    ref = dropout_attention_reference(q.double(), k.double(), v.double(), mask, is_causal=True)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
for name in ("attention_forward", "attention_backward (dk, dv)", "attention_backward (dq)"):
    for config in autotuners()[name].cache.values():
        assert 128 % config.kwargs["BLOCK_M"] == 0 and 128 % config.kwargs["BLOCK_N"] == 0, config
print("ok")
"""


@pytest.mark.gpu
def test_autotuning_fits_the_semantic_block(tmp_path):
    """Tuned kernels (head dims 64, 128, 256) compute the right result with tiles that divide the
    mask's block."""
    env = dict(os.environ, SLICECOMPILE_AUTOTUNE="1", TRITON_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", _TUNE], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split()[-1] == "ok", run.stderr[-3000:]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("by_columns", [False, True])
def test_kept_tile_lists(is_causal, by_columns):
    """Drop-keys' loops: each line lists, ascending, exactly the kept tiles that some query of the
    line sees, after (first, count); the first `first` need no per-element test (a row's tiles wholly
    seen by its first query and inside Lk; a column's tiles that straddle the diagonal come first)."""
    torch.manual_seed(3)
    bm, bn, lk = 32, 16, 16 * 7 - 5
    keep = torch.rand(2, 3, 5, 7, device=DEVICE) > 0.4
    lists = kept_tile_lists(keep, (bm, bn), lk, is_causal, by_columns)
    assert lists.dtype == torch.int32 and lists.shape == ((2, 3, 7, 7) if by_columns else (2, 3, 5, 9))
    for b, h, line in ((b, h, line) for b in range(2) for h in range(3) for line in range(lists.shape[2])):
        first, count, *tiles = lists[b, h, line].tolist()
        expected, tests_free = [], []
        for other in range(5 if by_columns else 7):
            r, c = (other, line) if by_columns else (line, other)
            seen = not is_causal or c * bn <= r * bm + bm - 1  # the row's last query sees the tile's first key
            if keep[b, h, r, c] and seen:
                expected.append(other)
                if by_columns:
                    tests_free.append(not is_causal or r * bm >= c * bn + bn - 1)
                else:
                    tests_free.append((c + 1) * bn <= lk and (not is_causal or (c + 1) * bn - 1 <= r * bm))
        assert tiles[:count] == expected
        needs_test = [not free for free in tests_free]
        if by_columns:
            assert first == sum(needs_test) and needs_test == sorted(needs_test, reverse=True)
        else:
            assert first == sum(tests_free) and tests_free == sorted(tests_free, reverse=True)
