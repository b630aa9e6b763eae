"""hashed_linear_cross_entropy against the dense reference restricted to the same active tiles
(loss, dX, dW, db), the selection's rules (label tiles first, an exact budget, seeds), its quality
on planted data, evaluation, ignore_index, reductions, empty batches and bad inputs."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from slicecompile import (
    hashed_linear_cross_entropy,
    hashed_linear_cross_entropy_reference,
    hashed_linear_cross_entropy_with_tiles,
    select_active_tiles,
)

from conftest import DEVICE
from tolerance import assert_close

# The module, not the function of the same name that slicecompile.ops exports.
op_module = importlib.import_module("slicecompile.ops.hashed_linear_cross_entropy")
sampled_softmax = importlib.import_module("slicecompile.ops.sampled_softmax")
blocks = st.tuples(st.sampled_from([16, 32, 64]), st.sampled_from([16, 32, 64]))


def ce_inputs(lead, E, N, dtype=torch.float32, bias=True, ignored=0.0):
    """x (*lead, E), weight (N, E), bias (N,) or None (leaves requiring grad) and target (*lead,)
    with a fraction `ignored` of rows at ignore_index."""
    x = torch.randn(*lead, E, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(N, E, device=DEVICE) / max(E, 1) ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(N, device=DEVICE).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, N, tuple(lead), device=DEVICE)
    target[torch.rand(tuple(lead), device=DEVICE) < ignored] = -100
    return x, w, b, target


def check_against_reference(x, w, b, target, tiles, block, reduction="mean"):
    """The op under `tiles` against the float64 reference and the reference in x's dtype: the loss
    and every gradient. The gradients are sums over logits whose gradients (softmax minus one-hot)
    cancel, so their slack scales with Σ|dZ||·| over N terms (dX) or M rows (dW, db)."""
    loss = hashed_linear_cross_entropy_with_tiles(x, w, target, tiles, b, block=block, reduction=reduction)
    grad = torch.randn_like(loss, dtype=torch.float32).to(loss.dtype)
    loss.backward(grad)
    leaves = [t for t in (x, w, b) if t is not None]
    wide = _reference_and_gradients(leaves, target, tiles, block, reduction, grad, torch.float64)
    same = _reference_and_gradients(leaves, target, tiles, block, reduction, grad, x.dtype)
    magnitude = _gradient_magnitudes(leaves, target, tiles, block, reduction, grad)
    m, n = target.numel(), w.shape[0]
    assert_close(loss, wide[0], same[0], "loss")
    for name, actual, i in zip(["dx", "dw", "db"], [t.grad for t in leaves], range(1, len(leaves) + 1)):
        assert_close(actual, wide[i], same[i], name, magnitude[i - 1], n if name == "dx" else m)
    return loss


def _reference_and_gradients(leaves, target, tiles, block, reduction, grad, dtype):
    copies = [t.detach().to(dtype).requires_grad_() for t in leaves]
    bias = copies[2] if len(copies) == 3 else None
    ref = hashed_linear_cross_entropy_reference(*copies[:2], target, tiles, bias, block=block, reduction=reduction)
    ref.backward(grad.to(dtype))
    return [ref] + [c.grad for c in copies]


def _gradient_magnitudes(leaves, target, tiles, block, reduction, grad):
    """Σ|dZ||W| (dX), Σ|dZ|ᵀ|X| (dW) and Σ|dZ| (db) in float64, dZ the reference's logit gradient."""
    x64, w64 = (t.detach().double() for t in leaves[:2])
    x2d = x64.reshape(-1, x64.shape[-1])
    b64 = leaves[2].detach().double() if len(leaves) == 3 else None
    logits = F.linear(x2d, w64, b64).requires_grad_()
    kept = op_module.active_neurons(tiles, target.reshape(-1), block, w64.shape[0])
    loss = F.cross_entropy(logits.masked_fill(~kept, float("-inf")), target.reshape(-1), reduction=reduction)
    loss.backward(grad.double().reshape(loss.shape))
    dz = logits.grad.abs()
    magnitudes = [(dz @ w64.abs()).reshape(x64.shape), dz.t() @ x2d.abs()]
    return magnitudes + ([dz.sum(0)] if b64 is not None else [])


@given(
    lead=st.lists(st.integers(1, 60), min_size=1, max_size=2).filter(lambda s: math.prod(s) <= 150),
    E=st.integers(1, 48),
    N=st.integers(1, 300),
    active=st.floats(0.01, 1.0),
    block=blocks,
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ignored=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_on_the_same_tiles(lead, E, N, active, block, dtype, bias, reduction, ignored, seed):
    torch.manual_seed(seed)
    x, w, b, target = ce_inputs(lead, E, N, dtype, bias, ignored)
    tiles = select_active_tiles(x, w, target, active=active, block=block)
    check_against_reference(x, w, b, target, tiles, block, reduction)


def test_chunked_gathers_match_reference(monkeypatch):
    """The torch path (a CPU's) in many (block-rows, columns) chunks, as a large layer takes them."""
    monkeypatch.setattr(sampled_softmax, "GATHER_FRACTION", 0.01)
    monkeypatch.setattr(sampled_softmax, "MIN_CHUNK_ELEMENTS", 1)
    torch.manual_seed(0)
    x, w, b, target = ce_inputs((100,), 24, 2000, ignored=0.1)
    tiles = select_active_tiles(x, w, target, active=0.3, block=(16, 32))
    assert len(sampled_softmax._chunks(tiles.shape[0], tiles.shape[1] * 32, w, 32)) > 10
    check_against_reference(x, w, b, target, tiles, (16, 32))


def test_the_op_uses_the_selection_its_seed_draws():
    torch.manual_seed(0)
    x, w, b, target = ce_inputs((3, 40), 32, 500)
    torch.manual_seed(7)
    loss = hashed_linear_cross_entropy(x, w, target, b, active=0.2, block=(16, 32))
    torch.manual_seed(7)
    tiles = select_active_tiles(x, w, target, active=0.2, block=(16, 32))
    assert torch.equal(loss, hashed_linear_cross_entropy_with_tiles(x, w, target, tiles, b, block=(16, 32)))
    torch.manual_seed(7)
    assert torch.equal(tiles, select_active_tiles(x, w, target, active=0.2, block=(16, 32)))


def test_different_seeds_choose_different_tiles():
    torch.manual_seed(0)
    x, w, _, _ = ce_inputs((64,), 32, 4096)
    unlabelled = torch.full((64,), -100, device=DEVICE)
    selections = set()
    for seed in range(5):
        torch.manual_seed(seed)
        selections.add(tuple(select_active_tiles(x, w, unlabelled, active=0.05, block=(16, 64)).flatten().tolist()))
    assert len(selections) == 5


@given(
    M=st.integers(1, 200),
    N=st.integers(1, 600),
    active=st.floats(0.01, 1.0),
    block=blocks,
    labels=st.sampled_from(["few", "many", "none"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_budget_is_exact_and_label_tiles_come_first(M, N, active, block, labels, seed):
    torch.manual_seed(seed)
    x, w, _, _ = ce_inputs((M,), 16, N)
    n_tiles = -(-N // block[1])
    pool = {"few": min(N, 3), "many": N, "none": 0}[labels]
    target = torch.randint(0, max(pool, 1), (M,), device=DEVICE) if pool else torch.full((M,), -100, device=DEVICE)
    tiles = select_active_tiles(x, w, target, active=active, block=block)
    budget = max(1, min(n_tiles, math.ceil(round(active * N / block[1], 9))))
    assert tiles.shape == (-(-M // block[0]), budget) and tiles.dtype == torch.int64
    for i, row in enumerate(tiles.tolist()):
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < n_tiles, "distinct, ascending, in range"
        chosen = set(row)
        found = target[i * block[0] : (i + 1) * block[0]]
        counts = torch.bincount(found[found >= 0] // block[1], minlength=n_tiles)
        label_tiles = set(counts.nonzero().flatten().tolist())
        if len(label_tiles) <= budget:
            assert label_tiles <= chosen
        else:  # all label tiles, those holding the most labels
            assert chosen <= label_tiles
            assert min(counts[sorted(chosen)]) >= max(counts[sorted(label_tiles - chosen)])


def test_labels_outside_the_budget_still_enter_their_rows_softmax():
    """One tile of budget, 64 rows with labels in many tiles: each row's own label logit joins its
    softmax, so the loss is finite and matches the reference, and the left-out label rows of W get
    their gradient."""
    torch.manual_seed(0)
    x, w, b, target = ce_inputs((64,), 16, 640)
    tiles = select_active_tiles(x, w, target, active=0.01, block=(64, 32))
    assert tiles.shape == (1, 1)
    check_against_reference(x, w, b, target, tiles, (64, 32))
    outside = target[target // 32 != tiles[0, 0]]
    assert outside.numel() > 0 and (w.grad[outside].abs().sum(1) > 0).all()


def test_selection_finds_each_samples_top_neuron_on_planted_data():
    """x_i = w_{c_i} + noise: the tiles chosen for x_i's block-row hold the argmax of x_i's full
    logits far more often than a random choice of as many tiles would (hit rate budget / tiles,
    binomial standard error over the rows)."""
    torch.manual_seed(0)
    E, N, M, block = 64, 2048, 512, (16, 16)
    w = torch.randn(N, E, device=DEVICE)
    x = w[torch.randint(0, N, (M,), device=DEVICE)] + 0.1 * torch.randn(M, E, device=DEVICE)
    top_tile = (x @ w.t()).argmax(dim=1) // block[1]
    unlabelled = torch.full((M,), -100, device=DEVICE)  # no label tiles: the hashing alone
    tiles = select_active_tiles(x, w, unlabelled, active=1 / 8, block=block)
    chosen = tiles[torch.arange(M, device=DEVICE) // block[0]]
    hit_rate = (chosen == top_tile[:, None]).any(dim=1).float().mean().item()
    random_rate = tiles.shape[1] / (N // block[1])
    assert hit_rate > random_rate + 8 * math.sqrt(random_rate * (1 - random_rate) / M), (hit_rate, random_rate)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_eval_and_no_grad_are_exactly_the_dense_loss(reduction):
    torch.manual_seed(0)
    x, w, b, target = ce_inputs((4, 30), 32, 300, ignored=0.2)
    dense = F.cross_entropy(F.linear(x, w, b).reshape(120, 300), target.reshape(-1), reduction=reduction)
    dense = dense.reshape(4, 30) if reduction == "none" else dense
    assert torch.equal(hashed_linear_cross_entropy(x, w, target, b, reduction=reduction, training=False), dense)
    with torch.no_grad():
        assert torch.equal(hashed_linear_cross_entropy(x, w, target, b, reduction=reduction), dense)


def test_all_tiles_active_is_the_dense_loss():
    torch.manual_seed(0)
    x, w, b, target = ce_inputs((70,), 40, 130, ignored=0.2)
    tiles = select_active_tiles(x, w, target, active=1.0, block=(32, 32))
    assert tiles.shape == (3, 5)
    loss = check_against_reference(x, w, b, target, tiles, (32, 32))
    x64, w64, b64 = (t.detach().double() for t in (x, w, b))
    dense64 = F.cross_entropy(F.linear(x64, w64, b64), target)
    assert_close(loss, dense64, F.cross_entropy(F.linear(x, w, b), target), "full loss")


def test_ignored_rows_have_no_loss_and_no_gradient():
    torch.manual_seed(0)
    x, w, b, target = ce_inputs((50,), 24, 200, ignored=0.4)
    losses = hashed_linear_cross_entropy(x, w, target, b, reduction="none", block=(16, 32))
    losses.sum().backward()
    ignored = target == -100
    assert ignored.any() and (losses[ignored] == 0).all() and (x.grad[ignored] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_or_an_empty_batch_behaves_as_cross_entropy(reduction):
    for M, ignore in ((8, True), (0, False)):
        x, w, b, target = ce_inputs((M,), 16, 40)
        if ignore:
            target.fill_(-100)
        loss = hashed_linear_cross_entropy(x, w, target, b, reduction=reduction, block=(16, 16))
        dense = F.cross_entropy(F.linear(x, w, b), target, reduction=reduction)
        assert torch.equal(loss, dense) or (loss.isnan().all() and dense.isnan().all())
        if loss.numel():
            loss.sum().backward()
            assert (x.grad == 0).all() and (w.grad == 0).all() and (b.grad == 0).all()


def _bad(**changes):
    x = torch.randn(10, 8, device=DEVICE)
    args = dict(x=x, weight=torch.randn(20, 8, device=DEVICE), target=torch.randint(0, 20, (10,), device=DEVICE))
    return args | changes


BAD = [
    (_bad(target=torch.randint(0, 20, (10,), device=DEVICE).float()), TypeError, "target must hold int64"),
    (_bad(target=torch.randint(0, 20, (10,), device=DEVICE, dtype=torch.int32)), TypeError, "target must hold int64"),
    (_bad(target=torch.randint(0, 20, (11,), device=DEVICE)), ValueError, "leading shape"),
    (_bad(target=torch.tensor([20] + [0] * 9, device=DEVICE)), ValueError, "outside"),
    (_bad(target=torch.tensor([-1] + [0] * 9, device=DEVICE)), ValueError, "outside"),
    (_bad(target=[0] * 10), TypeError, "target must be a torch.Tensor"),
    (_bad(weight=torch.randn(20, 9, device=DEVICE)), ValueError, "in_features"),
    (_bad(weight=torch.randn(0, 8, device=DEVICE)), ValueError, "weight has no rows"),
    (_bad(x=torch.randn(10, 8, device=DEVICE, dtype=torch.float64)), TypeError, "dtype"),
    (_bad(x=torch.randn(10, 8, device=DEVICE).bfloat16()), TypeError, "share one dtype"),
    (_bad(active=0.0), ValueError, "active"),
    (_bad(active=1.5), ValueError, "active"),
    (_bad(active=float("nan")), ValueError, "active"),
    (_bad(active="0.1"), TypeError, "active"),
    (_bad(block=(16, 24)), ValueError, "powers of two"),
    (_bad(block=(16,)), TypeError, "block"),
    (_bad(bits=0), ValueError, "bits"),
    (_bad(bits=17), ValueError, "bits"),
    (_bad(bits=4.0), TypeError, "bits"),
    (_bad(tables=0), ValueError, "tables"),
    (_bad(tables=True), TypeError, "tables"),
    (_bad(reduction="max"), ValueError, "reduction"),
    (_bad(ignore_index=None), TypeError, "ignore_index"),
]


@pytest.mark.parametrize("args, error, match", BAD, ids=[f"{i}-{case[2]}" for i, case in enumerate(BAD)])
def test_bad_inputs_raise(args, error, match):
    if match == "outside" and DEVICE != "cpu":
        pytest.skip("out-of-range targets fail a device-side assert on a GPU, which would end the suite's CUDA context")
    with pytest.raises(error, match=match):
        hashed_linear_cross_entropy(**args)


@pytest.mark.parametrize(
    "tiles, error, match",
    [
        (torch.zeros(1, 1, device=DEVICE, dtype=torch.int64), ValueError, "tiles must have shape"),
        (torch.zeros(1, 3, device=DEVICE, dtype=torch.int64), ValueError, "tiles must have shape"),
        (torch.zeros(1, 1, device=DEVICE, dtype=torch.int32), TypeError, "tiles must be int64"),
    ],
)
def test_bad_tiles_raise(tiles, error, match):
    x, w, _, target = ce_inputs((20,), 8, 40)
    with pytest.raises(error, match=match):
        hashed_linear_cross_entropy_with_tiles(x, w, target, tiles, block=(16, 16))
