"""WeightCodes: hashed_linear_cross_entropy re-hashes its weight only on the schedule, any other
tensor or shape re-hashes, the first call selects as an uncached one does, stale codes change the
choice of tiles but never the loss over them, and seeds reproduce a run."""

import importlib

import pytest
import torch

from slicecompile import WeightCodes, hashed_linear_cross_entropy, select_active_tiles

from test_hashed_linear_cross_entropy import ce_inputs, check_against_reference

simhash = importlib.import_module("slicecompile.ops.simhash")
op_module = importlib.import_module("slicecompile.ops.hashed_linear_cross_entropy")
BLOCK = (16, 32)


@pytest.fixture
def hashes(monkeypatch):
    """How many times the weight has been hashed (lookup_codes called)."""
    count = {"n": 0}
    original = simhash.lookup_codes

    def counting(*args):
        count["n"] += 1
        return original(*args)

    monkeypatch.setattr(simhash, "lookup_codes", counting)
    return count


@pytest.mark.parametrize(("m", "bits", "tables", "period"), [(256, 12, 4, 12), (2048, 12, 4, 2), (4096, 12, 4, 1)])
def test_auto_refreshes_so_that_hashing_costs_a_share_of_a_dense_gemm(m, bits, tables, period):
    assert WeightCodes().period(bits, tables, m) == period
    assert WeightCodes(refresh=5).period(bits, tables, m) == 5


def test_the_weight_is_hashed_once_a_period(hashes):
    torch.manual_seed(0)
    x, w, b, target = ce_inputs((40,), 16, 400)
    codes = WeightCodes(refresh=3)
    for _ in range(7):
        hashed_linear_cross_entropy(x, w, target, b, active=0.2, block=BLOCK, weight_codes=codes).backward()
    assert hashes["n"] == 3  # calls 1, 4 and 7
    for _ in range(3):  # evaluation computes the dense loss and neither hashes nor counts
        hashed_linear_cross_entropy(x, w, target, b, block=BLOCK, training=False, weight_codes=codes)
    assert codes.calls_since_refresh == 0 and hashes["n"] == 3


def test_another_weight_or_other_bits_rehash(hashes):
    torch.manual_seed(0)
    x, w, b, target = ce_inputs((40,), 16, 400)
    codes = WeightCodes(refresh=100)
    select_active_tiles(x, w, target, block=BLOCK, weight_codes=codes)
    select_active_tiles(x, w, target, block=BLOCK, weight_codes=codes)
    assert hashes["n"] == 1
    select_active_tiles(x, w.detach().clone(), target, block=BLOCK, weight_codes=codes)
    assert hashes["n"] == 2, "a different tensor of the same shape"
    select_active_tiles(x, w, target, block=BLOCK, bits=8, weight_codes=codes)
    assert hashes["n"] == 3
    codes.reset()
    select_active_tiles(x, w, target, block=BLOCK, bits=8, weight_codes=codes)
    assert hashes["n"] == 4


def test_the_first_call_selects_as_an_uncached_call():
    torch.manual_seed(0)
    x, w, _, target = ce_inputs((3, 40), 32, 500)
    torch.manual_seed(7)
    uncached = select_active_tiles(x, w, target, active=0.2, block=BLOCK)
    torch.manual_seed(7)
    assert torch.equal(uncached, select_active_tiles(x, w, target, active=0.2, block=BLOCK, weight_codes=WeightCodes()))


def test_cached_codes_describe_the_weight_when_hashed():
    """After the weight changes, calls before the refresh rank tiles by the old weight's codes (the
    same codes tensor), and the refresh hashes the new weight."""
    torch.manual_seed(0)
    x, w, _, target = ce_inputs((64,), 16, 512)
    codes = WeightCodes(refresh=2)
    select_active_tiles(x, w, target, block=BLOCK, weight_codes=codes)
    held, planes = codes.codes, codes.planes
    assert torch.equal(held, simhash.lookup_codes(w.detach(), planes, 12, 4))
    with torch.no_grad():
        w.neg_()
    select_active_tiles(x, w, target, block=BLOCK, weight_codes=codes)
    assert codes.codes is held
    select_active_tiles(x, w, target, block=BLOCK, weight_codes=codes)
    assert not torch.equal(codes.planes, planes)
    assert torch.equal(codes.codes, simhash.lookup_codes(w.detach(), codes.planes, 12, 4))


def test_stale_codes_leave_the_loss_over_the_chosen_tiles_exact(monkeypatch):
    torch.manual_seed(0)
    x, w, b, target = ce_inputs((50,), 24, 700, ignored=0.1)
    codes = WeightCodes(refresh=10)
    hashed_linear_cross_entropy(x, w, target, b, active=0.2, block=BLOCK, weight_codes=codes)
    with torch.no_grad():
        w.mul_(-2).add_(0.1)
    chosen, select = [], op_module.select_tiles
    monkeypatch.setattr(op_module, "select_tiles", lambda *a: chosen.append(select(*a)) or chosen[-1])
    x.grad = w.grad = b.grad = None
    loss = hashed_linear_cross_entropy(x, w, target, b, active=0.2, block=BLOCK, weight_codes=codes)
    assert codes.calls_since_refresh == 1
    x.grad = w.grad = b.grad = None
    assert torch.equal(loss, check_against_reference(x, w, b, target, chosen[0], BLOCK))


def test_a_seed_and_new_codes_reproduce_a_run():
    torch.manual_seed(0)
    x, w, _, target = ce_inputs((64,), 16, 1024)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        codes = WeightCodes(refresh=2)
        runs.append([select_active_tiles(x, w, target, active=0.1, block=BLOCK, weight_codes=codes) for _ in range(5)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("refresh", [0, -1, 1.5, True, "sometimes"])
def test_bad_refresh_raises(refresh):
    with pytest.raises(ValueError, match="refresh must be"):
        WeightCodes(refresh=refresh)


def test_weight_codes_of_another_type_raise():
    x, w, b, target = ce_inputs((8,), 16, 64)
    with pytest.raises(TypeError, match="weight_codes must be a slicecompile.WeightCodes"):
        hashed_linear_cross_entropy(x, w, target, b, weight_codes={"refresh": 3})


def test_under_torch_compile_the_schedule_holds(hashes):
    """The codes are looked up outside the graph (torch.compiler.disable): a compiled step keeps
    the schedule instead of baking one call's decision into the graph."""
    torch.manual_seed(0)
    x, w, b, target = ce_inputs((40,), 16, 400)
    codes = WeightCodes(refresh=3)
    step = torch.compile(
        lambda: hashed_linear_cross_entropy(x, w, target, b, active=0.2, block=BLOCK, weight_codes=codes),
        backend="eager",
    )
    for _ in range(6):
        step().backward()
    assert hashes["n"] == 2 and codes.calls_since_refresh == 2
