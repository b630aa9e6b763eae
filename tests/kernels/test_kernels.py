"""The masked-GEMM primitives against dense references under explicit masks."""

import importlib
import os
import subprocess
import sys

import pytest
import torch
import triton
from hypothesis import given
from hypothesis import strategies as st

from slicecompile import draw_block_mask
from slicecompile.kernels import sparse_input_matmul, sparse_output_matmul
from slicecompile.kernels.runtime import fit_to_mask, size_key
from slicecompile.kernels.sparse_input_matmul import MAX_SPLITS, split_reduction
from slicecompile.ops import masks

from conftest import DEVICE
from tolerance import assert_close

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
blocks = st.tuples(st.sampled_from([16, 32, 64]), st.sampled_from([16, 32, 64]))


def _for_tma(tma, block, *sizes):
    """The mask's block and sizes for the tensor-memory-accelerator kernels when tma is set: their
    tiles need blocks of 128 and their descriptors 16-byte aligned rows (sizes rounded up to
    multiples of 8, still ragged against the block)."""
    if not tma:
        return (block, *sizes)
    return ((128, 128), *(-(-n // 8) * 8 for n in sizes))


def _operand(rows, cols, dtype, transposed):
    """A (rows, cols) tensor, stored transposed when asked (strides (1, rows))."""
    if transposed:
        return torch.randn(cols, rows, device=DEVICE).to(dtype).t()
    return torch.randn(rows, cols, device=DEVICE).to(dtype)


@given(
    M=st.integers(1, 200),
    K=st.integers(1, 200),
    N=st.integers(1, 150),
    p=st.sampled_from([0.0, 0.3, 0.5, 0.8]),
    block=blocks,
    dtype=dtypes,
    bias=st.booleans(),
    a_t=st.booleans(),
    b_t=st.booleans(),
    tma=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_input_matmul(M, K, N, p, block, dtype, bias, a_t, b_t, tma, seed):
    torch.manual_seed(seed)
    block, M, K, N = _for_tma(tma, block, M, K, N)
    a, b = _operand(M, K, dtype, a_t), _operand(K, N, dtype, b_t)
    c_bias = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    mask = draw_block_mask(M, K, p, block, device=DEVICE)
    out = sparse_input_matmul(a, b, mask.kept, mask.count, mask.block, mask.scale, bias=c_bias, tma=tma)

    def ref(a, b, c_bias):
        y = (a * mask.elements().to(a.dtype)) @ b * mask.scale
        return y if c_bias is None else y + c_bias

    wide = [None if t is None else t.double() for t in (a, b, c_bias)]
    assert_close(out, ref(*wide), ref(a, b, c_bias), "sparse_input_matmul")


@given(
    M=st.integers(1, 200),
    K=st.integers(1, 200),
    N=st.integers(1, 150),
    p=st.sampled_from([0.0, 0.3, 0.5, 0.8]),
    block=blocks,
    dtype=dtypes,
    a_t=st.booleans(),
    b_t=st.booleans(),
    tma=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_output_matmul(M, K, N, p, block, dtype, a_t, b_t, tma, seed):
    torch.manual_seed(seed)
    block, M, K, N = _for_tma(tma, block, M, K, N)
    a, b = _operand(M, K, dtype, a_t), _operand(K, N, dtype, b_t)
    mask = draw_block_mask(M, N, p, block, device=DEVICE)
    out = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)  # every element must be written
    sparse_output_matmul(a, b, mask.tiles(), mask.block, mask.scale, out=out, tma=tma)

    def ref(a, b):
        return (a @ b) * mask.elements().to(a.dtype) * mask.scale

    assert_close(out, ref(a.double(), b.double()), ref(a, b), "sparse_output_matmul")
    assert (out[~mask.elements()] == 0).all(), "dropped tiles are written as zeros"


@pytest.mark.parametrize("split_k", [None, "auto", 2, 3])
@pytest.mark.parametrize("tma, block, M, K", [(False, (32, 16), 152, 88), (True, (128, 128), 1000, 264)])
def test_per_row_counts_and_transposed_output(tma, block, M, K, split_k):
    """The weight-gradient role: rows keep different numbers of tiles (some fewer than the
    splits), output written transposed; split or not, the same sums."""
    torch.manual_seed(1)
    x, dy = torch.randn(M, K, device=DEVICE).half(), torch.randn(M, 72, device=DEVICE).half()
    mask = draw_block_mask(M, K, 0.5, block, device=DEVICE)
    rows, counts = mask.columns()
    assert counts.unique().numel() > 1, "the test needs unequal counts"
    out = torch.empty(72, K, device=DEVICE).half()
    sparse_input_matmul(x.t(), dy, rows, counts, block[::-1], mask.scale, out=out.t(), tma=tma, split_k=split_k)
    expected = dy.double().t() @ (x.double() * mask.elements()) * mask.scale
    assert_close(out, expected, dy.t() @ (x * mask.elements().half()) * mask.scale, "transposed role")


def test_split_reduction_fills_the_multiprocessors():
    """Splits where output tiles leave multiprocessors idle, none where they fill whole waves."""
    assert split_reduction(36, 132, 32) == 3  # a 768 x 768 weight gradient: 108 programs, one wave
    assert split_reduction(144, 132, 32) == 4  # 1.09 waves unsplit: 576 programs in 5 waves
    assert split_reduction(256, 132, 32) == 1  # 1.94 waves: nothing to gain
    assert split_reduction(1024, 132, 32) == 1
    assert split_reduction(36, 132, 3) == 1  # three kept tiles: too few to split
    assert 1 < split_reduction(1, 132, 64) <= MAX_SPLITS


def test_split_kernel_is_handed_every_split(monkeypatch):
    """Under torch.compile a kernel's writes count only inside the tensors it is handed (those it
    mutates are cloned by their own extent), so the split kernel gets all the splits' rows."""
    dsd = importlib.import_module("slicecompile.kernels.sparse_input_matmul")  # the package exports the function
    handed = []
    matmul = dsd.MATMUL
    monkeypatch.setattr(dsd, "MATMUL", lambda *args: handed.append(args[7].shape) or matmul(*args))
    torch.manual_seed(0)
    x, dy = torch.randn(64, 48, device=DEVICE), torch.randn(64, 40, device=DEVICE)
    mask = draw_block_mask(64, 48, 0.5, (16, 16), device=DEVICE)
    rows, counts = mask.columns()
    out = sparse_input_matmul(x.t(), dy, rows, counts, (16, 16), mask.scale, split_k=3)
    assert handed == [(3 * 48, 40)]
    expected = (x.double() * mask.elements()).t() @ dy.double() * mask.scale
    assert_close(out, expected, (x * mask.elements()).t() @ dy * mask.scale, "split")


def test_split_k_rejects_bad_arguments():
    x = torch.randn(32, 32, device=DEVICE)
    kept = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    count = torch.ones(1, dtype=torch.int32, device=DEVICE)
    for bad in (0, 1.5, True, "fastest"):
        with pytest.raises(ValueError, match='split_k must be a positive int, "auto" or None'):
            sparse_input_matmul(x, x, kept, count, (16, 16), 1.0, split_k=bad)
    with pytest.raises(ValueError, match="cannot be used with bias"):
        sparse_input_matmul(x, x, kept, count, (16, 16), 1.0, bias=x[0], split_k=2)


def _launch_input(a, b, mask, **kw):
    return sparse_input_matmul(a, b, mask.kept, mask.count, mask.block, mask.scale, **kw)


def test_launchers_reject_bad_operands():
    f32 = torch.randn(64, 64, device=DEVICE)
    mask = draw_block_mask(64, 64, 0.5, (32, 32), device=DEVICE)
    with pytest.raises(TypeError, match="dtype"):
        _launch_input(f32.to(torch.int32), f32, mask)
    with pytest.raises(TypeError, match="share a dtype"):
        _launch_input(f32, f32.half(), mask)
    with pytest.raises(ValueError, match="inner sizes"):
        _launch_input(f32, torch.randn(32, 8, device=DEVICE), mask)
    with pytest.raises(ValueError, match="2-D"):
        _launch_input(f32[None], f32, mask)
    with pytest.raises(TypeError, match="int32"):
        sparse_input_matmul(f32, f32, mask.kept.long(), mask.count, mask.block, mask.scale)
    with pytest.raises(ValueError, match="kept must have shape"):
        sparse_input_matmul(f32, f32, mask.kept[:1], mask.count, mask.block, mask.scale)
    with pytest.raises(ValueError, match="bias"):
        _launch_input(f32, f32, mask, bias=torch.randn(3, device=DEVICE))
    with pytest.raises(ValueError, match="out must have shape"):
        _launch_input(f32, f32, mask, out=torch.empty(3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="keep must have shape"):
        sparse_output_matmul(f32, f32, mask.tiles()[:1], mask.block, mask.scale)
    with pytest.raises(TypeError, match="keep must be"):
        sparse_output_matmul(f32, f32, mask.tiles().float(), mask.block, mask.scale)


def test_tma_refuses_misaligned_operands_and_small_blocks():
    mask = draw_block_mask(64, 60, 0.5, (128, 128), device=DEVICE)
    a, b = torch.randn(64, 60, device=DEVICE).half(), torch.randn(60, 64, device=DEVICE).half()  # 120-byte rows
    with pytest.raises(ValueError, match="tensor memory accelerator"):
        _launch_input(a, b, mask, tma=True)
    small = draw_block_mask(64, 64, 0.5, (64, 64), device=DEVICE)
    with pytest.raises(ValueError, match="at least 128"):
        _launch_input(a[:, :56], b[:56], small, tma=True)
    mask = draw_block_mask(64, 60, 0.5, (32, 32), device=DEVICE)
    out = _launch_input(a, b, mask)  # tma=None falls back to the pointer kernel
    assert_close(out, (a.double() * mask.elements()) @ b.double() * 2, (a * mask.elements()) @ b * 2, "fallback")


def test_kernel_tiles_must_divide_the_mask_block():
    """A tile larger than the mask's block would change which elements are dropped."""
    f32 = torch.randn(64, 64, device=DEVICE)
    mask = draw_block_mask(64, 64, 0.5, (16, 16), device=DEVICE)
    config = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="must divide the mask's block"):
        _launch_input(f32, f32, mask, config=config)
    with pytest.raises(ValueError, match="must divide the mask's block"):
        sparse_output_matmul(f32, f32, mask.tiles(), mask.block, mask.scale, config=config)


def test_size_keys_are_power_of_two_buckets():
    assert [size_key(n) for n in (1, 2, 3, 200, 256, 257, 8192)] == [1, 2, 4, 256, 256, 512, 8192]


def test_configs_shrink_to_fit_the_mask_block():
    configs = [
        triton.Config(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), num_warps=8, num_stages=3),
        triton.Config(dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64), num_warps=8, num_stages=3),
    ]
    fitted = fit_to_mask(configs, {}, BLOCK_M=32, BLOCK_K=128)
    assert [c.kwargs for c in fitted] == [dict(BLOCK_M=32, BLOCK_N=256, BLOCK_K=64)], "shrunk, duplicates dropped"


_TUNE = """
import torch
from slicecompile import dropout_linear_with_mask, draw_block_mask
from slicecompile.kernels import autotuners
for M in (256, 200):
    x = torch.randn(M, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(192, 256, device="cuda", dtype=torch.bfloat16)
    mask = draw_block_mask(M, 256, 0.5, (128, 128), device="cuda")
    y = dropout_linear_with_mask(x, w, None, mask)
    ref = (x.double() * mask.elements()) @ w.double().t() * mask.scale
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
tuner = autotuners()["sparse_input_matmul (tma)"]
(config,) = tuner.cache.values()  # M = 256 and M = 200 share one power-of-two bucket
assert 128 % config.kwargs["BLOCK_M"] == 0 and 128 % config.kwargs["BLOCK_K"] == 0
print("benchmarked" if hasattr(tuner, "bench_time") else "from disk")
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cols, block", [(64, 64, (32, 16)), (50, 70, (16, 32)), (16, 16, (16, 16))])
def test_forward_writes_the_compact_copy(rows, cols, block, dtype):
    """compact_out receives what masks.gather_tiles makes (zeros past x's edges and in the slots
    past the count), and the product is still right."""
    torch.manual_seed(0)
    x, b = torch.randn(rows, cols, device=DEVICE).to(dtype), torch.randn(cols, 40, device=DEVICE).to(dtype)
    for p in (0.3, 0.6):
        mask = masks.draw_block_mask(rows, cols, p, block, device=DEVICE)
        slots = masks.max_count(mask.grid[1], p)
        compact = torch.full((rows, slots * block[1]), float("nan"), device=DEVICE, dtype=dtype)
        out = sparse_input_matmul(x, b, mask.kept, mask.count, block, 2.0, compact_out=compact)
        ref = lambda x, b, mask=mask: (x * mask.elements().to(x.dtype)) @ b * 2.0
        assert_close(out, ref(x.double(), b.double()), ref(x, b), "product while writing the copy")
        assert torch.equal(compact, masks.gather_tiles(x, mask.kept, block, slots))


def test_compact_out_rejects_bad_arguments():
    x = torch.randn(32, 32, device=DEVICE)
    kept = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    count = torch.ones(1, dtype=torch.int32, device=DEVICE)
    call = lambda compact, **kw: sparse_input_matmul(x, x, kept, count, (16, 16), 1.0, compact_out=compact, **kw)
    with pytest.raises(TypeError, match="compact_out must be a tensor of a's dtype"):
        call(torch.empty(32, 16, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"compact_out must have shape \(32, slots \* 16\)"):
        call(torch.empty(32, 48, device=DEVICE))
    with pytest.raises(ValueError, match="whole tiles of 16"):
        call(torch.empty(32, 8, device=DEVICE))
    with pytest.raises(ValueError, match="cannot be used with compact_a"):
        call(torch.empty(32, 16, device=DEVICE), compact_a=True)


@pytest.mark.gpu
def test_autotuning_buckets_sizes_and_caches_on_disk(tmp_path):
    """A tuned kernel picks a config that fits the mask and computes the right result; sizes in
    one power-of-two bucket share one tuning; a second process reads the choice from disk."""
    env = dict(os.environ, SLICECOMPILE_AUTOTUNE="1", TRITON_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", _TUNE], env=env, capture_output=True, text=True) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert [run.stdout.split()[-1] for run in runs] == ["benchmarked", "disk"]
