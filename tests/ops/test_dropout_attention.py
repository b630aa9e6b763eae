"""dropout_attention against the dense reference under the same tile mask: forward and every
gradient, the mask's distribution and unbiasedness, what backward saves, reproducibility,
eval / p = 0, torch.compile, checkpointing, empty and bad inputs; then the "dropkey" policy:
its reference against the definition written out, the op against the reference, the tile kept
in each block-row, p honoured, reproducibility."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

import slicecompile.ops.dispatch as dispatch
from slicecompile import (
    AttentionMask,
    draw_attention_mask,
    dropout_attention,
    dropout_attention_reference,
    dropout_attention_with_mask,
)
from slicecompile.ops import attention_reference

from conftest import DEVICE
from tolerance import assert_close

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def inputs(B, H, Hk, Lq, Lk, E, Ev, dtype=torch.float32):
    """q, k, v leaves requiring grad."""
    shapes = [(B, H, Lq, E), (B, Hk, Lk, E), (B, Hk, Lk, Ev)]
    return [torch.randn(shape, device=DEVICE).to(dtype).requires_grad_() for shape in shapes]


def forward_and_grads(fn, leaves, grad):
    """[fn(*leaves), then each leaf's gradient under grad], leaves as fresh copies."""
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*copies)
    out.backward(grad.to(out.dtype))
    return [out] + [t.grad for t in copies]


def op_magnitudes(leaves, mask, attn_mask, is_causal, grad, scale):
    """[(magnitude, terms)] of out and each gradient for tolerance.assert_close, as
    tests/kernels/test_attention_kernels.magnitudes derives them: the float64 sums of absolute
    terms, dS = P (dP − D) bounded by P (|dP| + |D|); terms are each reduction's length plus what
    reaches it through P (scores' rounding, the normaliser) and, in 16-bit dtypes, one rounding
    of the second GEMM's intermediate operand."""
    if leaves[0].dim() == 3:
        batched = [t.unsqueeze(0) for t in leaves[:3]] + leaves[3:]
        bounds = op_magnitudes(batched, mask, attn_mask, is_causal, grad.unsqueeze(0), scale)
        return [(magnitude.squeeze(0), terms) for magnitude, terms in bounds]
    rounding = torch.finfo(leaves[0].dtype).eps / torch.finfo(torch.float32).eps
    q, k, v = (t.detach().double() for t in leaves[:3])
    grad = grad.double().abs()
    (_, _, Lq, E), (_, Hk, Lk, Ev), group = q.shape, v.shape, q.shape[1] // v.shape[1]
    k_all, v_all = k.abs().repeat_interleave(group, 1), v.abs().repeat_interleave(group, 1)
    wide_mask = attn_mask if attn_mask is None or not attn_mask.is_floating_point() else attn_mask.detach().double()
    scores = attention_reference.scores(q, k, wide_mask, is_causal, scale)
    if mask.policy == "dropkey":  # P over the kept keys, nothing rescaled
        scores, keep = scores.masked_fill(~mask.elements(), float("-inf")), 1.0
    else:
        keep = mask.elements() * mask.scale
    probs = attention_reference.probabilities(scores)
    out = probs * keep @ v_all
    ds = probs * ((grad @ v_all.transpose(-1, -2)) * keep + (grad * out).sum(-1, True))
    per_group = lambda t: t.reshape(t.shape[0], Hk, group, *t.shape[2:]).sum(2)  # noqa: E731
    spread = Lk + E * (q.abs() @ k_all.transpose(-1, -2) * scale).max().item() + rounding
    result = [
        (out, spread + Lk),
        (ds @ k_all * scale, spread + Lk + Ev),
        (per_group(ds.transpose(-1, -2) @ q.abs() * scale), spread + group * Lq + Ev),
        (per_group((probs * keep).transpose(-1, -2) @ grad), spread + group * Lq),
    ]
    if len(leaves) == 4:
        result.append((ds.sum_to_size(attn_mask.shape), spread + Ev + ds.numel() / attn_mask.numel()))
    return result


def check_against_reference(leaves, mask, attn_mask=None, is_causal=False, scale=None):
    """The op's output and every gradient (the additive mask's when it is a leaf) against the
    reference under the same mask, in float64 and in the inputs' dtype."""
    q = leaves[0]
    scale_used = q.shape[-1] ** -0.5 if scale is None else scale
    grad = torch.randn(*q.shape[:-1], leaves[2].shape[-1], device=DEVICE).to(q.dtype)

    def call(fn, dtype):
        def run(q, k, v, *mask_leaf):
            bias = mask_leaf[0] if mask_leaf else attn_mask
            if bias is not None and bias.is_floating_point():
                bias = bias.to(dtype)
            args = (q.to(dtype), k.to(dtype), v.to(dtype), mask, bias, is_causal, scale)
            return fn(*args, enable_gqa=True)

        return forward_and_grads(run, leaves, grad)

    actual = call(dropout_attention_with_mask, q.dtype)
    wide, same = call(dropout_attention_reference, torch.float64), call(dropout_attention_reference, q.dtype)
    bounds = op_magnitudes(leaves, mask, attn_mask, is_causal, grad, scale_used)
    for what, a, w, s, (magnitude, terms) in zip(["out", "dq", "dk", "dv", "d_attn_mask"], actual, wide, same, bounds):
        assert_close(a, w, s, what, magnitude, terms)
    return actual


@given(
    B=st.integers(1, 2),
    heads=st.sampled_from([(1, 1), (2, 1)]),
    Lq=st.integers(1, 40),
    Lk=st.integers(1, 40),
    head_dims=st.sampled_from([(16, 16), (32, 16)]),
    is_causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "additive with grad"]),
    dtype=dtypes,
    p=st.sampled_from([0.2, 0.6]),
    block=st.tuples(st.sampled_from([32, 64]), st.sampled_from([32, 64])),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(B, heads, Lq, Lk, head_dims, is_causal, mask_kind, dtype, p, block, seed):
    torch.manual_seed(seed)
    (H, Hk), (E, Ev) = heads, head_dims
    leaves = inputs(B, H, Hk, Lq, Lk, E, Ev, dtype)
    attn_mask = None
    if mask_kind == "bool":
        attn_mask = torch.rand(Lq, Lk, device=DEVICE) > 0.25
    elif mask_kind == "additive with grad":
        attn_mask = torch.randn(H, Lq, 1, device=DEVICE).to(dtype).requires_grad_()  # broadcast over keys
        leaves.append(attn_mask)
    check_against_reference(leaves, draw_attention_mask(B, H, Lq, Lk, p, block, device=DEVICE), attn_mask, is_causal)


def test_three_dimensional_inputs_and_explicit_scale():
    torch.manual_seed(0)
    q, k, v = (t[0].detach().requires_grad_() for t in inputs(1, 2, 2, 40, 30, 16, 16))
    mask = draw_attention_mask(1, 2, 40, 30, 0.5, (32, 16), device=DEVICE)
    out, *_ = check_against_reference([q, k, v], mask, scale=0.3)
    assert out.shape == (2, 40, 16)


@pytest.mark.parametrize("policy", ["dropout", "dropkey"])
def test_reference_path_matches_kernels(monkeypatch, policy):
    """The pure-PyTorch path (CPU tensors without the interpreter) gives the kernels' results."""
    torch.manual_seed(0)
    leaves = inputs(2, 2, 1, 50, 40, 16, 32)
    bias = torch.randn(50, 40, device=DEVICE, requires_grad=True)
    mask = draw_attention_mask(2, 2, 50, 40, 0.5, (32, 32), device=DEVICE, policy=policy, is_causal=True)
    grad = torch.randn(2, 2, 50, 32, device=DEVICE)
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(dispatch, "use_kernels", lambda t, k=kernels: k)
        fn = lambda q, k, v, b: dropout_attention_with_mask(q, k, v, mask, b, is_causal=True, enable_gqa=True)  # noqa: E731
        results.append(forward_and_grads(fn, [*leaves, bias], grad))
    for kernel_result, torch_result in zip(*results):
        torch.testing.assert_close(kernel_result, torch_result)


def test_tiles_are_kept_independently_with_probability_one_minus_p():
    torch.manual_seed(0)
    p, draws = 0.3, 200
    tables = torch.stack([draw_attention_mask(2, 3, 100, 70, p, (32, 16), device=DEVICE).tiles for _ in range(draws)])
    assert tables.shape == (draws, 2, 3, 4, 5) and tables.dtype == torch.bool
    rate = tables.double().mean(0)  # per tile position, over draws
    sigma = math.sqrt(p * (1 - p) / draws)
    assert ((rate - (1 - p)).abs() <= 5 * sigma).all(), rate
    # Independent tiles, unlike the linear ops' balanced masks: a plane's count of kept tiles varies.
    counts = tables.flatten(-2).sum(-1).double()  # per (query, key) plane of 4 x 5 tiles
    expected_var = 20 * p * (1 - p)
    assert abs(counts.var().item() - expected_var) < 0.3 * expected_var
    neighbours = torch.corrcoef(torch.stack([tables[..., 0, 0].flatten(), tables[..., 0, 1].flatten()]).double())
    assert neighbours[0, 1].abs() < 5 / math.sqrt(tables[..., 0, 0].numel())


def test_output_is_unbiased(monkeypatch):
    """Mean over draws ≈ SDPA without dropout: each output is a sum over key tiles of the tile's
    P·V contribution c, kept with probability 1 - p and scaled by 1 / (1 - p), whose variance is
    c² p / (1 - p)."""
    monkeypatch.setattr(dispatch, "use_kernels", lambda t: False)  # many draws: the fast path
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in inputs(1, 2, 2, 32, 64, 16, 8))
    p, draws, block = 0.5, 1000, (16, 16)
    with torch.no_grad():
        mean = sum(dropout_attention(q, k, v, dropout_p=p, block=block) for _ in range(draws)) / draws
        probs = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1)
        contributions = torch.einsum("bhqtk,bhtke->bhqte", probs.unflatten(-1, (4, 16)), v.unflatten(2, (4, 16)))
        sigma = (contributions.pow(2).sum(3) * p / (1 - p) / draws).sqrt()
        dense = F.scaled_dot_product_attention(q, k, v)
    assert ((mean - dense).abs() <= 5 * sigma + 1e-6).all()


def test_backward_saves_nothing_element_wise():
    """Every saved tensor is O(L·E) (q, k, v, the output, one log-sum-exp per row) or the tile
    table: nothing of (B, H, Lq, Lk)."""
    B, H, L, E = 1, 2, 64, 16
    q, k, v = inputs(B, H, H, L, L, E, E)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = dropout_attention(q, k, v, dropout_p=0.5, is_causal=True, block=(16, 16))
    assert saved, "the hook sees what backward saves"
    assert all(t.numel() <= B * H * L * E for t in saved), [tuple(t.shape) for t in saved]
    assert not any(t.shape[-2:] == (L, L) for t in saved)
    assert sum(t.dtype == torch.bool for t in saved) == 1, "the tile table, and no element-wise mask"
    out.sum().backward()


def test_seed_reproduces_the_op_and_its_mask():
    q, k, v = (t.detach() for t in inputs(2, 2, 2, 40, 40, 16, 16))
    run = lambda: dropout_attention(q, k, v, dropout_p=0.4, block=(16, 32))  # noqa: E731
    torch.manual_seed(3)
    out = run()
    torch.manual_seed(3)
    mask = draw_attention_mask(2, 2, 40, 40, 0.4, (16, 32), device=DEVICE)
    torch.manual_seed(3)
    assert torch.equal(out, run())
    assert torch.equal(out, dropout_attention_with_mask(q, k, v, mask))
    assert not torch.equal(out, run()), "the next draw differs"


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(is_causal=True), dict(attn_mask="bool"), dict(attn_mask="additive"), dict(enable_gqa=True)],
    ids=["plain", "causal", "bool mask", "additive mask", "gqa"],
)
def test_eval_and_p_zero_are_exactly_sdpa(kwargs):
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in inputs(1, 4, 2 if kwargs.get("enable_gqa") else 4, 20, 30, 16, 16))
    masks = {"bool": torch.rand(20, 30, device=DEVICE) > 0.3, "additive": torch.randn(20, 30, device=DEVICE)}
    kwargs = dict(kwargs, attn_mask=masks.get(kwargs.get("attn_mask")), scale=0.2)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(dropout_attention(q, k, v, dropout_p=0.5, training=False, **kwargs), expected)
    assert torch.equal(dropout_attention(q, k, v, dropout_p=0.0, **kwargs), expected)


@pytest.mark.parametrize(
    "kwargs",
    [dict(is_causal=True), dict(attn_mask="bool"), dict(attn_mask="additive")],
    ids=["causal", "bool mask", "additive mask"],
)
def test_every_tile_kept_is_sdpa(kwargs):
    """With a mask that keeps every tile, the op and the reference are SDPA: the same causal
    alignment (query i sees keys j <= i, Lq != Lk), boolean True = attend, and head h reading
    kv head h // (H // Hk)."""
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in inputs(1, 4, 2, 40, 24, 16, 16))
    masks = {"bool": torch.rand(40, 24, device=DEVICE) > 0.3, "additive": torch.randn(40, 24, device=DEVICE)}
    kwargs = dict(kwargs, attn_mask=masks.get(kwargs.get("attn_mask")), enable_gqa=True)
    mask = draw_attention_mask(1, 4, 40, 24, 0.0, (16, 16), device=DEVICE)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    wide = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), **dict(kwargs, attn_mask=_wide(kwargs["attn_mask"]))
    )
    assert_close(dropout_attention_with_mask(q, k, v, mask, **kwargs), wide, expected, "op")
    torch.testing.assert_close(dropout_attention_reference(q, k, v, mask, **kwargs), expected)


def _wide(attn_mask):
    return attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask


def test_rows_that_see_no_key_give_zeros_and_zero_gradients():
    torch.manual_seed(0)
    q, k, v = inputs(1, 2, 2, 24, 20, 16, 16)
    attn_mask = torch.ones(24, 20, dtype=torch.bool, device=DEVICE)
    attn_mask[5] = False
    out = dropout_attention(q, k, v, attn_mask, dropout_p=0.5, block=(16, 16))
    out.sum().backward()
    assert torch.isfinite(out).all() and (out[:, :, 5] == 0).all()
    assert (q.grad[:, :, 5] == 0).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert (F.scaled_dot_product_attention(q, k, v, attn_mask)[:, :, 5] == 0).all(), "SDPA's convention"


def test_compiles_once_with_a_dynamic_sequence_length():
    counter = CompileCounterWithBackend("aot_eager")
    fn = lambda q, k, v: dropout_attention(q, k, v, dropout_p=0.3, is_causal=True, block=(16, 16))  # noqa: E731
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for L in (24, 40):
        torch.manual_seed(0)
        q, k, v = inputs(1, 2, 2, L, L, 16, 16)
        out = compiled(q, k, v)
        out.sum().backward()
        assert out.shape == (1, 2, L, 16) and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert counter.frame_count == 1, "a second length reuses the graph"


def test_compiled_matches_eager_under_one_mask():
    torch.manual_seed(0)
    leaves = inputs(1, 2, 1, 30, 20, 16, 16)
    mask = draw_attention_mask(1, 2, 30, 20, 0.5, (16, 16), device=DEVICE)
    fn = lambda q, k, v: dropout_attention_with_mask(q, k, v, mask, enable_gqa=True)  # noqa: E731
    grad = torch.randn(1, 2, 30, 16, device=DEVICE)
    compiled = forward_and_grads(torch.compile(fn, backend="aot_eager", fullgraph=True), leaves, grad)
    for a, b in zip(compiled, forward_and_grads(fn, leaves, grad)):
        torch.testing.assert_close(a, b)


def test_checkpoint_recompute_reuses_the_mask():
    """Recomputation under torch.utils.checkpoint draws the same mask (the RNG state is restored),
    so gradients equal those of the run without checkpointing."""
    leaves = inputs(1, 2, 2, 40, 40, 16, 16)
    grad = torch.randn(1, 2, 40, 16, device=DEVICE)
    fn = lambda q, k, v: dropout_attention(q, k, v, dropout_p=0.5, block=(16, 16))  # noqa: E731
    torch.manual_seed(5)
    plain = forward_and_grads(fn, leaves, grad)
    torch.manual_seed(5)
    checkpointed = forward_and_grads(lambda *t: checkpoint(fn, *t, use_reentrant=False), leaves, grad)
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)


# opcheck's test_aot_dispatch_dynamic takes 8 s here; the torch.compile tests cover AOTAutograd.
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("drop_keys", [False, True])
def test_opcheck(drop_keys):
    torch.manual_seed(0)
    q, k, v = inputs(1, 2, 1, 20, 24, 16, 16)
    bias = torch.randn(20, 24, device=DEVICE, requires_grad=True)
    mask = draw_attention_mask(1, 2, 20, 24, 0.5, (16, 16), device=DEVICE)
    ops = torch.ops.slicecompile
    args = (q, k, v, bias, mask.tiles, 16, 16, 0.5, True, 0.25, drop_keys)
    torch.library.opcheck(ops.block_dropout_attention.default, args, test_utils=OPCHECKS)
    out, lse = ops.block_dropout_attention(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
    grad_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, bias.detach(), mask.tiles)
    backward_args = (*grad_args, 16, 16, 0.5, True, 0.25, True, drop_keys)
    torch.library.opcheck(ops.block_dropout_attention_backward.default, backward_args, test_utils=OPCHECKS)


EMPTY = {
    "no batch": (0, 2, 2, 8, 8),
    "no heads": (1, 0, 0, 8, 8),
    "no queries": (1, 2, 2, 0, 8),
    "no keys": (1, 2, 2, 8, 0),
}


@pytest.mark.parametrize("B, H, Hk, Lq, Lk", EMPTY.values(), ids=EMPTY.keys())
def test_empty_inputs_give_what_sdpa_gives(B, H, Hk, Lq, Lk):
    if H == 0 and DEVICE == "cuda":
        pytest.skip("SDPA's own CUDA backward fails an internal assert with no heads (torch 2.11, H200)")
    results = []
    for fn in (lambda *t: dropout_attention(*t, dropout_p=0.5, block=16), F.scaled_dot_product_attention):
        torch.manual_seed(0)
        leaves = inputs(B, H, Hk, Lq, Lk, 16, 16)
        out = fn(*leaves)
        out.sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert a.shape == b.shape and torch.equal(a, b)


def _bad(**change):
    args = dict(q=torch.randn(1, 2, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16), dropout_p=0.5)
    args.update(change)
    return {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in args.items()}


BAD_INPUTS = [
    (_bad(dropout_p=1.0), ValueError, r"p must be in \[0, 1\)"),
    (_bad(dropout_p=-0.2), ValueError, r"p must be in \[0, 1\)"),
    (_bad(block=(48, 16)), ValueError, "powers of two"),
    (_bad(block=(8, 16)), ValueError, "powers of two"),
    (_bad(q=torch.randn(2, 8, 16)), ValueError, "must all be 4-D"),
    (_bad(q=torch.randn(1, 1, 2, 8, 16)), ValueError, "must all be 4-D"),
    (_bad(k=torch.randn(1, 2, 8, 32)), ValueError, "head dim 16 differs from k's 32"),
    (_bad(v=torch.randn(1, 2, 9, 16)), ValueError, "share heads and length"),
    (_bad(q=torch.randn(2, 2, 8, 16)), ValueError, "share a batch size"),
    (_bad(q=torch.randn(1, 4, 8, 16)), ValueError, "enable_gqa=True"),
    (_bad(q=torch.randn(1, 3, 8, 16), enable_gqa=True), ValueError, "must divide"),
    (_bad(k=torch.randn(1, 2, 8, 16).half()), TypeError, "share one dtype"),
    (_bad(q=torch.randn(1, 2, 8, 16).double()), TypeError, "q has dtype torch.float64"),
    (_bad(attn_mask=torch.zeros(7, 8)), ValueError, "does not broadcast"),
    (_bad(attn_mask=torch.zeros(2, 1, 2, 8, 8)), ValueError, "does not broadcast"),
    (_bad(attn_mask=torch.zeros(8, 8, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
    (_bad(attn_mask=[[0.0]]), TypeError, "attn_mask must be a torch.Tensor"),
    (_bad(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (_bad(scale="big"), TypeError, "scale must be a float"),
    (_bad(is_causal=1), TypeError, "is_causal and enable_gqa must be bools"),
    (_bad(q=torch.randn(1, 2, 8, 264), k=torch.randn(1, 2, 8, 264)), ValueError, "at most 256"),
]


@pytest.mark.parametrize("args, error, match", BAD_INPUTS)
def test_bad_inputs_raise(args, error, match):
    with pytest.raises(error, match=match):
        dropout_attention(**args)


def test_mask_must_fit_the_attention():
    q, k, v = (t.detach() for t in inputs(1, 2, 2, 20, 30, 16, 16))
    with pytest.raises(ValueError, match="the mask covers"):
        dropout_attention_with_mask(q, k, v, draw_attention_mask(1, 2, 30, 20, 0.5, 16, device=DEVICE))
    with pytest.raises(TypeError, match="mask must be an AttentionMask"):
        dropout_attention_with_mask(q, k, v, draw_attention_mask(1, 2, 20, 30, 0.5, 16, device=DEVICE).tiles)
    with pytest.raises(TypeError, match="lq must be a non-negative int"):
        draw_attention_mask(1, 2, -1, 30, 0.5, 16)
    assert isinstance(draw_attention_mask(1, 2, 20, 30, 0.5, 16), AttentionMask)


@pytest.mark.gpu
def test_devices_must_match():
    with pytest.raises(ValueError, match="one device"):
        cpu = [torch.randn(1, 2, 8, 16, device="cpu") for _ in range(2)]
        dropout_attention(torch.randn(1, 2, 8, 16, device="cuda"), *cpu)


@pytest.mark.gpu
def test_training_step_never_synchronises_with_the_host():
    q, k, v = (torch.randn(2, 8, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dropout_attention(q, k, v, dropout_p=0.1, is_causal=True).sum().backward()  # compile the kernels first
    torch.cuda.set_sync_debug_mode("error")
    try:
        dropout_attention(q, k, v, dropout_p=0.1, is_causal=True).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_follows_autocast():
    """Under torch.autocast the operands are cast to its dtype first, as SDPA's are."""
    q, k, v = (t.detach() for t in inputs(1, 2, 2, 16, 16, 16, 16))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        torch.manual_seed(0)
        out = dropout_attention(q, k, v, dropout_p=0.5, block=16)
        assert F.scaled_dot_product_attention(q, k, v).dtype == torch.bfloat16
    torch.manual_seed(0)
    assert torch.equal(out, dropout_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), dropout_p=0.5, block=16))


@pytest.mark.gpu
def test_inductor_launches_the_kernels():
    """Under torch.compile with Inductor the triton_ops' kernels run from compiled code, with the
    eager results."""
    leaves = inputs(2, 4, 2, 300, 200, 64, 64, torch.bfloat16)
    mask = draw_attention_mask(2, 4, 300, 200, 0.3, (128, 128), device=DEVICE)
    fn = lambda q, k, v: dropout_attention_with_mask(q, k, v, mask, is_causal=True, enable_gqa=True)  # noqa: E731
    grad = torch.randn(2, 4, 300, 64, device=DEVICE, dtype=torch.bfloat16)
    compiled = forward_and_grads(torch.compile(fn, fullgraph=True), leaves, grad)
    for a, b in zip(compiled, forward_and_grads(fn, leaves, grad)):
        torch.testing.assert_close(a, b)


# DropKey (policy="dropkey"): tiles of keys dropped before the softmax, nothing rescaled.

FORCED_P = 1 - 1e-6  # every drawn tile dropped (for these seeds): only the forced ones are kept


def dropkey_definition(q, k, v, tiles, block, attn_mask=None, is_causal=False):
    """DropKey written out, query row by query row: the softmax of q·k / √E over the keys the row
    sees (causal, a boolean attn_mask) whose tile is kept, then the weighted sum of their values;
    zeros for a row that sees none. (B, H, Lq, E) inputs, k and v heads shared by groups."""
    (B, H, Lq, E), Lk, group = q.shape, k.shape[2], q.shape[1] // k.shape[1]
    kept = tiles.repeat_interleave(block[0], 2)[:, :, :Lq].repeat_interleave(block[1], 3)[..., :Lk]
    out = q.new_zeros(B, H, Lq, v.shape[-1])
    for b, h, i in itertools.product(range(B), range(H), range(Lq)):
        keys = kept[b, h, i] & (torch.arange(Lk) <= i if is_causal else True)
        keys = keys & (attn_mask[i] if attn_mask is not None else True)
        if keys.any():
            weights = (k[b, h // group, keys] @ q[b, h, i] * E**-0.5).softmax(0)
            out[b, h, i] = weights @ v[b, h // group, keys]
    return out


def visible_tiles(rows, cols, block, is_causal):
    """(rows, cols) bool: the tiles whose first key a block-row's first query sees (so every
    query of the block sees a key of them), under top-left causal masking; all tiles otherwise."""
    if not is_causal:
        return torch.ones(rows, cols, dtype=torch.bool)
    return torch.arange(cols) * block[1] <= torch.arange(rows)[:, None] * block[0]


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Lq, Lk", [(40, 24), (24, 40), (33, 33)])
def test_dropkey_reference_is_the_definition(Lq, Lk, is_causal):
    torch.manual_seed(0)
    q, k, v = (t.detach().double() for t in inputs(2, 4, 2, Lq, Lk, 16, 8))
    attn_mask = torch.rand(Lq, Lk) > 0.2
    mask = draw_attention_mask(2, 4, Lq, Lk, 0.6, (16, 16), policy="dropkey", is_causal=is_causal)
    expected = dropkey_definition(q, k, v, mask.tiles, mask.block, attn_mask, is_causal)
    actual = dropout_attention_reference(q, k, v, mask, attn_mask, is_causal, enable_gqa=True)
    torch.testing.assert_close(actual, expected)
    assert mask.scale == 1.0 and mask.policy == "dropkey"


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_dropkey_reference_backward_is_its_forwards_gradient(is_causal):
    """forward and backward (what the op runs without the kernels) under drop_keys: the output of
    the definition, and the gradients autograd takes of it from the log-sum-exp over kept keys;
    dS, so the additive mask's gradient, is zero on dropped tiles."""
    torch.manual_seed(0)
    q, k, v = (t.detach().double().requires_grad_() for t in inputs(1, 2, 1, 40, 48, 16, 8))
    bias = torch.randn(2, 40, 48, dtype=torch.float64, requires_grad=True)  # one per head
    mask = draw_attention_mask(1, 2, 40, 48, 0.5, (16, 16), policy="dropkey", is_causal=is_causal)
    expected = dropout_attention_reference(q, k, v, mask, bias, is_causal, 0.3, enable_gqa=True)
    grad = torch.randn_like(expected)
    args = (q, k, v, bias, mask.tiles, mask.block, mask.p, is_causal, 0.3)
    with torch.no_grad():
        out, lse = attention_reference.forward(*args, drop_keys=True)
        grads = attention_reference.backward(grad, *args[:3], out, lse, *args[3:], True, drop_keys=True)
    torch.testing.assert_close(out, expected)
    for actual, wanted in zip(grads, torch.autograd.grad(expected, (q, k, v, bias), grad)):
        # P is recomputed in float32 from the float32 log-sum-exp, as the kernels do: float32's tolerance
        torch.testing.assert_close(actual.float(), wanted.float())
    assert (grads[3][~mask.elements()[0]] == 0).all()


# Half the profile's examples (10 in CI): the kernels' paths are test_matches_reference's.
@settings(max_examples=max(1, settings.default.max_examples // 2))
@given(
    B=st.integers(1, 2),
    heads=st.sampled_from([(1, 1), (2, 1)]),
    Lq=st.integers(1, 40),
    Lk=st.integers(1, 40),
    is_causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "additive with grad"]),
    dtype=dtypes,
    p=st.sampled_from([0.3, 0.8]),
    block=st.tuples(st.sampled_from([32, 64]), st.sampled_from([32, 64])),
    seed=st.integers(0, 2**31 - 1),
)
def test_dropkey_matches_reference(B, heads, Lq, Lk, is_causal, mask_kind, dtype, p, block, seed):
    torch.manual_seed(seed)
    (H, Hk) = heads
    leaves = inputs(B, H, Hk, Lq, Lk, 16, 16, dtype)
    attn_mask = None
    if mask_kind == "bool":
        attn_mask = torch.rand(Lq, Lk, device=DEVICE) > 0.25
    elif mask_kind == "additive with grad":
        attn_mask = torch.randn(H, Lq, 1, device=DEVICE).to(dtype).requires_grad_()
        leaves.append(attn_mask)
    mask = draw_attention_mask(B, H, Lq, Lk, p, block, device=DEVICE, policy="dropkey", is_causal=is_causal)
    check_against_reference(leaves, mask, attn_mask, is_causal)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Lq, Lk, block", [(100, 70, (16, 32)), (70, 100, (32, 16)), (64, 64, (16, 16))])
def test_dropkey_keeps_one_visible_tile_in_each_block_row(Lq, Lk, block, is_causal):
    """A block-row none of whose drawn tiles its queries all see keeps one more (causal: the
    diagonal tile, holding key i·BM, or the last; otherwise its largest draw); every other tile
    is as drawn, so p is honoured as closely as the rule allows. Every query row sees a key."""
    rows, cols = -(-Lq // block[0]), -(-Lk // block[1])
    visible = visible_tiles(rows, cols, block, is_causal)
    diagonal = torch.arange(cols) == (torch.arange(rows)[:, None] * block[0] // block[1]).clamp(max=cols - 1)
    for p in (0.7, FORCED_P):
        torch.manual_seed(1)
        uniform = torch.rand(2, 3, rows, cols, device=DEVICE)
        torch.manual_seed(1)
        tiles = draw_attention_mask(2, 3, Lq, Lk, p, block, device=DEVICE, policy="dropkey", is_causal=is_causal).tiles
        drawn, chosen = uniform >= p, diagonal if is_causal else uniform == uniform.amax(-1, keepdim=True)
        blind = ~(drawn & visible).any(-1, keepdim=True)
        assert torch.equal(tiles, drawn | (chosen & blind))
        assert (tiles & visible).any(-1).all()
        if p == FORCED_P:
            assert torch.equal(tiles, chosen.expand_as(tiles)), "p close to 1: the forced tile alone"
    q, k, v = (torch.randn(2, 3, length, 16, device=DEVICE) for length in (Lq, Lk, Lk))
    mask = draw_attention_mask(2, 3, Lq, Lk, FORCED_P, block, device=DEVICE, policy="dropkey", is_causal=is_causal)
    _, lse = attention_reference.forward(q, k, v, None, mask.tiles, block, mask.p, is_causal, 0.25, drop_keys=True)
    assert torch.isfinite(lse).all(), "every query row sees a kept key"


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_dropkey_honours_p_in_expectation(is_causal):
    """Each tile is kept with probability 1 - p, plus a block-row's forced tile when none of its
    n visible tiles was drawn (probability p^n): E[kept tiles in a row] = cols (1 - p) + p^n.
    Tiles no block-row may be forced to keep (right of the diagonal) keep exactly 1 - p."""
    torch.manual_seed(0)
    p, draws, block, (rows, cols) = 0.5, 4000, (16, 16), (4, 3)
    tiles = draw_attention_mask(draws, 1, 64, 48, p, block, device=DEVICE, policy="dropkey", is_causal=is_causal).tiles
    counts = tiles[:, 0].sum(-1).double()  # (draws, rows)
    visible = visible_tiles(rows, cols, block, is_causal).sum(-1).double()
    expected = cols * (1 - p) + p**visible
    sigma = counts.std(0) / math.sqrt(draws)
    assert ((counts.mean(0) - expected).abs() <= 5 * sigma).all(), (counts.mean(0), expected)
    if is_causal:
        rate = tiles[:, 0, 0, 1:].double().mean().item()  # block-row 0 sees tile 0 only
        assert abs(rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / (2 * draws))


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_dropkey_mask_compiles_once_with_dynamic_sizes(is_causal):
    """The rule is torch ops on symbolic sizes: one graph for two lengths, the eager tables."""
    counter = CompileCounterWithBackend("aot_eager")

    def draw(q):
        return draw_attention_mask(*q.shape, 0.7, 16, device=q.device, policy="dropkey", is_causal=is_causal).tiles

    compiled = torch.compile(draw, backend=counter, fullgraph=True, dynamic=True)
    for length in (40, 72):
        q = torch.empty(2, 3, length, 56, device=DEVICE)
        torch.manual_seed(0)
        tiles = compiled(q)
        torch.manual_seed(0)
        assert torch.equal(tiles, draw(q))
    assert counter.frame_count == 1


def test_dropkey_seed_reproduces_the_op_and_its_mask():
    q, k, v = (t.detach() for t in inputs(1, 2, 2, 40, 40, 16, 16))
    run = lambda: dropout_attention(q, k, v, dropout_p=0.6, is_causal=True, block=(16, 32), policy="dropkey")  # noqa: E731
    torch.manual_seed(3)
    out = run()
    torch.manual_seed(3)
    mask = draw_attention_mask(1, 2, 40, 40, 0.6, (16, 32), device=DEVICE, policy="dropkey", is_causal=True)
    torch.manual_seed(3)
    assert torch.equal(out, run())
    assert torch.equal(out, dropout_attention_with_mask(q, k, v, mask, is_causal=True))
    assert not torch.equal(out, run()), "the next draw differs"


def test_dropkey_in_eval_or_at_p_zero_is_sdpa():
    q, k, v = (t.detach() for t in inputs(1, 2, 2, 20, 30, 16, 16))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for p, training in ((0.5, False), (0.0, True)):
        assert torch.equal(dropout_attention(q, k, v, None, p, True, training=training, policy="dropkey"), expected)


def test_unknown_policies_raise():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    match = "unknown attention policy 'dropconnect'; known policies: dropout, dropkey"
    with pytest.raises(ValueError, match=match):
        dropout_attention(q, q, q, dropout_p=0.5, policy="dropconnect")
    with pytest.raises(ValueError, match=match):
        draw_attention_mask(1, 2, 8, 8, 0.5, 16, policy="dropconnect")
    with pytest.raises(ValueError, match=match):
        AttentionMask(torch.ones(1, 2, 1, 1, dtype=torch.bool), (1, 2, 8, 8), (16, 16), 0.5, "dropconnect")
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        draw_attention_mask(1, 2, 8, 8, 0.5, 16, policy="dropkey", is_causal=1)
