"""backend="slicecompile" under torch.distributed: DDP (with DDPOptimizer's bucket splitting and
without it) and FSDP2 (fully_shard), two CPU processes on gloo.

Two ranks, spawned once for the module, run each scenario: a training step of a user-defined
module on *different* inputs with the same torch seed, so both ranks draw the same masks (the
masks are per step, not per rank). Each rank asserts on its own slicecompile counters, that the
gradients are the same on both ranks (all_gather), and that they equal the average over both
ranks' inputs of the dense reference's gradients under the masks the compiled graph drew: an
all-reduce that was skipped, or gradients of the wrong mask, fail it. Inductor's fallback_random
makes the compiled graph draw its masks with eager's generator, as in test_backend. Each test
reports what its scenario raised in either rank.
"""

import copy
import datetime
import json
import os
import traceback

import torch

# Each rank imports this module afresh: Triton's interpreter must be on before slicecompile's
# kernels are imported (conftest does the same for the pytest process).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SLICECOMPILE_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from slicecompile import draw_block_mask  # noqa: E402

from tolerance import assert_close  # noqa: E402

WORLD, ROWS, FEATURES, HIDDEN = 2, 64, 64, 512
P, BLOCK, SEED, LR = 0.5, (32, 32), 7, 0.1
OPTIONS = {"block": BLOCK, "min_gemm_size": 0, "fallback_random": True}
# What DDPOptimizer's split would break without slicecompile/ddp.py.
EVERY_SITE = "every dropout -> linear site rewritten"


def _masked(t, mask):
    return t * mask.elements().to(t.dtype) * mask.scale


class FeedForward(nn.Module):
    """fc1 → ReLU → dropout → fc2 → ReLU → dropout → fc3: two dropout → linear sites. fc2's
    1 MiB weight fills a DDP bucket of bucket_cap_mb=1 by itself."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, FEATURES)
        self.drop = nn.Dropout(P)

    def forward(self, x):
        hidden = self.drop(self.fc1(x).relu())
        return self.fc3(self.drop(self.fc2(hidden).relu()))

    def reference(self, x, masks):
        """forward with each dropout replaced by its block mask, in graph order."""
        hidden = _masked(self.fc1(x).relu(), masks[0])
        return self.fc3(_masked(self.fc2(hidden).relu(), masks[1]))


class Block(nn.Module):
    """A residual MLP block: x + fc2(dropout(relu(fc1(x))))."""

    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(FEATURES, HIDDEN), nn.Dropout(P), nn.Linear(HIDDEN, FEATURES)

    def forward(self, x):
        return x + self.fc2(self.drop(self.fc1(x).relu()))

    def reference(self, x, mask):
        return x + self.fc2(_masked(self.fc1(x).relu(), mask))


class Blocks(nn.Module):
    """Two blocks and a head: FSDP2 shards each block and the root."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def reference(self, x, masks):
        for block, mask in zip(self.blocks, masks, strict=True):
            x = block.reference(x, mask)
        return self.head(x)


# ---- in each rank -------------------------------------------------------------------------


def _inputs():
    """One input per rank, the same on every rank (each rank computes the reference for all)."""
    return torch.randn(WORLD, ROWS, FEATURES, generator=torch.Generator().manual_seed(1))


def _masks(count):
    """The masks a compiled step draws after torch.manual_seed(SEED), in graph order."""
    torch.manual_seed(SEED)
    return [draw_block_mask(ROWS, HIDDEN, P, BLOCK) for _ in range(count)]


def _reference_grads(model, inputs, masks):
    """{dtype: [gradient per parameter]}: the reference's gradients of the summed squares,
    averaged over the ranks' inputs as the all-reduce averages them, in float64 and float32."""
    grads = {}
    for dtype in (torch.float64, torch.float32):
        ref = copy.deepcopy(model).to(dtype)
        losses = [ref.reference(x.to(dtype), masks).square().sum() for x in inputs]
        per_rank = [torch.autograd.grad(loss, ref.parameters()) for loss in losses]
        grads[dtype] = [sum(gs) / WORLD for gs in zip(*per_rank, strict=True)]
        grads[f"own {dtype}"] = per_rank[dist.get_rank()]
    return grads


def _check_all_reduced(grads):
    """This rank's gradients after the step: finite, and the same on every rank."""
    assert all(torch.isfinite(g).all() for g in grads), "non-finite gradients"
    flat = torch.cat([g.flatten() for g in grads])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(other, gathered[0]) for other in gathered), "gradients differ between ranks"


def _check_against_reference(names, grads, expected):
    """The reference's average over both ranks' inputs, not what this rank's input alone gives."""
    own = expected[f"own {torch.float32}"]
    for name, grad, ref64, ref32, ref_own in zip(
        names, grads, expected[torch.float64], expected[torch.float32], own, strict=True
    ):
        assert_close(grad, ref64, ref32, name)
        assert not torch.allclose(grad, ref_own, rtol=1e-3, atol=1e-4), f"{name}: only this rank's input"


def _check_different_inputs(x):
    gathered = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(gathered, x)
    assert not torch.equal(gathered[0], gathered[1]), "the ranks trained on the same input"


def _stats():
    return dict(counters["slicecompile"])


def _ddp_step(split):
    """One DDP step under torch.compile; split=False turns DDPOptimizer off (one graph)."""
    torch._dynamo.config.optimize_ddp = split
    torch.manual_seed(0)
    model = FeedForward()
    reference = copy.deepcopy(model)
    # 1 MiB buckets, in reverse graph order: fc3 + fc2 fill the first, fc1 makes a second.
    compiled = torch.compile(DDP(model, bucket_cap_mb=1), backend="slicecompile", options=OPTIONS)
    inputs = _inputs()
    x = inputs[dist.get_rank()]
    _check_different_inputs(x)
    torch.manual_seed(SEED)  # the same on both ranks: both draw the same masks
    compiled(x).square().sum().backward()

    stats = _stats()
    # split: the whole graph, rewritten before DDPOptimizer split it into two pieces
    assert stats.get("graphs") == 1 and stats.get("ddp_pieces") == (2 if split else None), stats
    assert stats.get("rewritten", 0) > 0 and "fallback" not in stats, stats
    names, params = zip(*model.named_parameters(), strict=True)
    grads = [p.grad for p in params]
    _check_all_reduced(grads)
    assert stats["rewritten"] == stats["sites"] == 2, f"{EVERY_SITE}: {stats}"
    _check_against_reference(names, grads, _reference_grads(reference, inputs, _masks(2)))


def _ddp_split(rank):
    _ddp_step(split=True)


def _ddp_unsplit(rank):
    _ddp_step(split=False)


def _full(dtensor):
    """A DTensor sharded on dim 0 by fully_shard, whole: its shards gathered with all_gather.
    (DTensor.full_tensor() on gloo crashed the process with a segmentation fault under torch 2.11.)"""
    local = dtensor.to_local().contiguous()
    shards = [torch.empty_like(local) for _ in range(WORLD)]
    dist.all_gather(shards, local)
    return torch.cat(shards)[: dtensor.shape[0]]


def _fsdp_step(rank):
    """Each block compiled, then sharded (torchtitan's order), then the root sharded; one step
    with SGD, and a second step that must reuse the compiled blocks."""
    torch.manual_seed(0)
    model = Blocks()
    reference = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (WORLD,))  # fully_shard's default mesh is on the GPU where there is one
    for block in model.blocks:
        block.compile(backend="slicecompile", options=OPTIONS)
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    inputs = _inputs()
    _check_different_inputs(inputs[rank])
    torch.manual_seed(SEED)
    model(inputs[rank]).square().sum().backward()

    stats = _stats()
    assert stats.get("rewritten") == stats.get("sites") == 2 and "fallback" not in stats, stats
    names = [name for name, _ in model.named_parameters()]
    grads = [_full(p.grad) for p in model.parameters()]  # sharded DTensor gradients
    _check_all_reduced(grads)
    _check_against_reference(names, grads, _reference_grads(reference, inputs, _masks(2)))

    optimizer.step()
    for name, param, start, grad in zip(names, model.parameters(), reference.parameters(), grads, strict=True):
        torch.testing.assert_close(_full(param), start - LR * grad, msg=f"{name} after SGD")
    optimizer.zero_grad()
    model(inputs[rank]).square().sum().backward()
    assert _stats()["graphs"] == stats["graphs"], f"the second step recompiled: {_stats()}"
    assert all(torch.isfinite(_full(p.grad)).all() for p in model.parameters())


SCENARIOS = {"ddp_without_split": _ddp_unsplit, "ddp_split": _ddp_split, "fsdp2": _fsdp_step}


def _rank(rank, folder):
    """Every scenario in turn, each from a fresh Dynamo; what each raised goes to a file."""
    torch.set_num_threads(1)  # two ranks on a small machine
    timeout = datetime.timedelta(seconds=120)  # a rank that died leaves the other in a collective
    rendezvous = f"file://{os.path.join(folder, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD, timeout=timeout)
    errors = {}
    try:
        for name, scenario in SCENARIOS.items():
            torch._dynamo.reset()
            counters["slicecompile"].clear()
            try:
                scenario(rank)
            except Exception:
                errors[name] = traceback.format_exc()
            dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(errors, f)


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    """{scenario: what each rank raised}. One spawn runs every scenario: each process pays
    Inductor's start-up (its imports, the CPU ISA probe) once, not once per test."""
    folder = tmp_path_factory.mktemp("distributed")
    mp.spawn(_rank, args=(str(folder),), nprocs=WORLD)
    by_rank = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    return {
        name: "\n".join(f"rank {rank}: {raised[name]}" for rank, raised in enumerate(by_rank) if name in raised)
        for name in SCENARIOS
    }


# ---- the tests ----------------------------------------------------------------------------


def test_ddp_without_graph_split_rewrites_and_all_reduces(errors):
    """torch._dynamo.config.optimize_ddp = False: one graph (no bucket-wise overlap of the
    all-reduce with backward), every site rewritten, gradients averaged over both ranks."""
    assert not errors["ddp_without_split"], errors["ddp_without_split"]


def test_ddp_split_graph_keeps_every_rewrite(errors):
    """DDPOptimizer splits the graph at 1 MiB buckets, right before fc2, whose bucket it fills:
    the backend rewrites the whole graph before the split (slicecompile/ddp.py), so both sites
    stay rewritten and the gradients are averaged over both ranks."""
    assert not errors["ddp_split"], errors["ddp_split"]


def test_fsdp2_per_block_compile_rewrites_and_reduces(errors):
    """fully_shard per block and root, each block compiled: both sites rewritten, the sharded
    gradients are the average over both ranks, SGD updates the shards, a second step reuses
    the compiled blocks."""
    assert not errors["fsdp2"], errors["fsdp2"]
