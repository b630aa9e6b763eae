"""The masked GEMMs' list options (a compact C over listed column tiles, a compact A, listed
row-blocks of A) against dense float64 references built from the same lists."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slicecompile.kernels import sparse_input_matmul, sparse_output_matmul

from conftest import DEVICE
from tolerance import assert_close

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
blocks = st.tuples(st.sampled_from([16, 32]), st.sampled_from([16, 32]))


def _lists(rows, n_tiles, width, generator):
    """(rows, width) int32: distinct tile indices in [0, n_tiles) per row, in random order."""
    table = [torch.randperm(n_tiles, generator=generator, device="cpu")[:width] for _ in range(rows)]
    return torch.stack(table).int().to(DEVICE)


def _listed_columns(dense, columns, block, n):
    """dense (M, >= N) logits' listed column tiles, compact (M, width * BN); -inf past n."""
    block_m, block_n = block
    rows = torch.arange(dense.shape[0], device=DEVICE) // block_m
    neurons = (columns.long()[rows, :, None] * block_n + torch.arange(block_n, device=DEVICE)).flatten(1)
    padded = torch.nn.functional.pad(dense, (0, int(neurons.max()) + 1 - n))
    return padded.gather(1, neurons).masked_fill(neurons >= n, float("-inf"))


@given(
    M=st.integers(1, 90),
    K=st.integers(1, 70),
    N=st.integers(1, 150),
    block=blocks,
    dtype=dtypes,
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_output_over_listed_columns(M, K, N, block, dtype, bias, seed):
    """The compact logits: block-row i's column tile j is a @ b's column tile columns[i, j]."""
    generator = torch.Generator().manual_seed(seed)
    n_tiles = -(-N // block[1])
    width = int(torch.randint(1, n_tiles + 1, (), generator=generator, device="cpu"))
    columns = _lists(-(-M // block[0]), n_tiles, width, generator)
    a = torch.randn(M, K, generator=generator, device="cpu").to(DEVICE, dtype)
    b = torch.randn(N, K, generator=generator, device="cpu").to(DEVICE, dtype).t()  # strides (1, K), as weight.t()
    c_bias = torch.randn(N, generator=generator, device="cpu").to(DEVICE, dtype) if bias else None
    out = torch.full((M, width * block[1]), float("nan"), device=DEVICE, dtype=dtype)
    sparse_output_matmul(a, b, None, block, 1.0, bias=c_bias, out=out, columns=columns)

    def ref(a, b, c_bias):
        dense = a @ b if c_bias is None else a @ b + c_bias
        return _listed_columns(dense, columns, block, N)

    expected = ref(a.double(), b.double(), None if c_bias is None else c_bias.double())
    past_n = expected.isinf()
    assert torch.equal(out.isinf(), past_n) and (out[past_n] < 0).all(), "columns past N are -inf, only they"
    same = ref(a, b, c_bias).masked_fill(past_n, 0)
    assert_close(out.masked_fill(past_n, 0), expected.masked_fill(past_n, 0), same, "listed columns")


def _compact_to_dense(a_compact, kept, count, block, k):
    """The (M, K) operand whose listed tiles the compact one holds, zeros elsewhere."""
    block_m, block_k = block
    dense = torch.zeros(a_compact.shape[0], -(-k // block_k) * block_k, dtype=a_compact.dtype, device=DEVICE)
    for i in range(kept.shape[0]):
        rows = slice(i * block_m, (i + 1) * block_m)
        for j in range(int(count[i])):
            tile = int(kept[i, j])
            dense[rows, tile * block_k : (tile + 1) * block_k] = a_compact[rows, j * block_k : (j + 1) * block_k]
    return dense[:, :k]


@given(
    M=st.integers(1, 90),
    K=st.integers(1, 150),
    N=st.integers(1, 70),
    block=blocks,
    dtype=dtypes,
    seed=st.integers(0, 2**31 - 1),
)
def test_compact_a(M, K, N, block, dtype, seed):
    """The input gradient's role: a holds only each block-row's listed K-tiles, in list order; b
    is read at the listed tiles (the last one ragged past K)."""
    generator = torch.Generator().manual_seed(seed)
    n_tiles, n_block_rows = -(-K // block[1]), -(-M // block[0])
    width = int(torch.randint(1, n_tiles + 1, (), generator=generator, device="cpu"))
    kept = _lists(n_block_rows, n_tiles, width, generator)
    count = torch.randint(0, width + 1, (n_block_rows,), generator=generator, device="cpu").int().to(DEVICE)
    a = torch.randn(M, width * block[1], generator=generator, device="cpu").to(DEVICE, dtype)
    b = torch.randn(K, N, generator=generator, device="cpu").to(DEVICE, dtype)
    out = sparse_input_matmul(a, b, kept, count, block, 1.0, compact_a=True)
    dense = _compact_to_dense(a.double(), kept, count, block, K)
    assert_close(out, dense @ b.double(), dense.to(dtype) @ b, "compact a")


@given(
    rows=st.integers(1, 90),
    A_M=st.integers(1, 90),
    K=st.integers(1, 120),
    N=st.integers(1, 70),
    block=blocks,
    dtype=dtypes,
    seed=st.integers(0, 2**31 - 1),
)
def test_listed_a_row_blocks(rows, A_M, K, N, block, dtype, seed):
    """The weight gradient's role: the result's row-block i sums a[row-block a_rows[i, j], K-tile
    kept[i, j]] @ b[K-tile kept[i, j]] over its list; a row-block whose count is 0 is zeros."""
    generator = torch.Generator().manual_seed(seed)
    block_m, block_k = block
    n_block_rows, a_blocks, k_tiles = -(-rows // block_m), -(-A_M // block_m), -(-K // block_k)
    width = int(torch.randint(1, k_tiles + 1, (), generator=generator, device="cpu"))
    kept = _lists(n_block_rows, k_tiles, width, generator)
    a_rows = torch.randint(0, a_blocks, kept.shape, generator=generator, device="cpu").int().to(DEVICE)
    count = torch.randint(0, width + 1, (n_block_rows,), generator=generator, device="cpu").int().to(DEVICE)
    a = torch.randn(A_M, K, generator=generator, device="cpu").to(DEVICE, dtype)
    a_t = torch.randn(K, A_M, generator=generator, device="cpu").to(DEVICE, dtype).t()  # dZᵀ's layout as well
    b = torch.randn(K, N, generator=generator, device="cpu").to(DEVICE, dtype)
    for operand in (a, a_t):
        out = torch.full((rows, N), float("nan"), device=DEVICE, dtype=dtype)
        sparse_input_matmul(operand, b, kept, count, block, 1.0, out=out, a_row_blocks=a_rows)

        def ref(a, b, operand=operand):
            padded = torch.nn.functional.pad(a, (0, k_tiles * block_k - K, 0, a_blocks * block_m - A_M))
            b = torch.nn.functional.pad(b, (0, 0, 0, k_tiles * block_k - K))
            result = torch.zeros(n_block_rows * block_m, N, dtype=a.dtype, device=DEVICE)
            for i in range(n_block_rows):
                for j in range(int(count[i])):
                    r, t = int(a_rows[i, j]), int(kept[i, j])
                    part = padded[r * block_m : (r + 1) * block_m, t * block_k : (t + 1) * block_k]
                    result[i * block_m : (i + 1) * block_m] += part @ b[t * block_k : (t + 1) * block_k]
            return result[:rows]

        assert_close(out, ref(operand.double(), b.double()), ref(operand, b), "listed a rows")


def test_accumulating_caller_gets_float32_from_16_bit_operands():
    """A float32 out of bfloat16 operands (the weight gradient, accumulated in float32)."""
    torch.manual_seed(0)
    a, b = torch.randn(48, 64, device=DEVICE).bfloat16(), torch.randn(64, 40, device=DEVICE).bfloat16()
    kept = torch.tensor([[1, 0], [0, 1], [1, 0]], dtype=torch.int32, device=DEVICE)
    count = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    out = sparse_input_matmul(a, b, kept, count, (16, 32), 1.0, out=torch.empty(48, 40, device=DEVICE))
    assert out.dtype == torch.float32
    expected = a.double() @ b.double()
    assert_close(out, expected, (a.float() @ b.float()), "float32 out")


def test_list_options_reject_bad_arguments():
    f32 = torch.randn(64, 64, device=DEVICE)
    lists = torch.zeros(4, 2, dtype=torch.int32, device=DEVICE)
    count = torch.ones(1, dtype=torch.int32, device=DEVICE)
    block = (16, 32)
    with pytest.raises(ValueError, match="either keep or columns"):
        sparse_output_matmul(f32, f32, torch.ones(4, 2, dtype=torch.uint8), block, 1.0, columns=lists)
    with pytest.raises(ValueError, match="keep is None"):
        sparse_output_matmul(f32, f32, None, block, 1.0)
    with pytest.raises(TypeError, match="columns must be an int32"):
        sparse_output_matmul(f32, f32, None, block, 1.0, columns=lists.long())
    with pytest.raises(ValueError, match="columns must have shape"):
        sparse_output_matmul(f32, f32, None, block, 1.0, columns=lists[:3])
    with pytest.raises(ValueError, match="columns must be 2-D"):
        sparse_output_matmul(f32, f32, None, block, 1.0, columns=lists[:, :0])
    with pytest.raises(ValueError, match="out must have shape"):
        sparse_output_matmul(f32, f32, None, block, 1.0, columns=lists, out=torch.empty(64, 32, device=DEVICE))
    with pytest.raises(TypeError, match="compact_a must be a bool"):
        sparse_input_matmul(f32, f32, lists, count, block, 1.0, compact_a=1)
    with pytest.raises(ValueError, match="a must have 64 columns"):
        sparse_input_matmul(f32[:, :48], f32, lists, count, block, 1.0, compact_a=True)
    with pytest.raises(TypeError, match="a_row_blocks must be an int32"):
        sparse_input_matmul(f32, f32, lists, count, block, 1.0, out=f32.clone(), a_row_blocks=lists.float())
    with pytest.raises(ValueError, match="a_row_blocks must have kept's shape"):
        sparse_input_matmul(f32, f32, lists, count, block, 1.0, out=f32.clone(), a_row_blocks=lists[:, :1])
    with pytest.raises(ValueError, match="needs out"):
        sparse_input_matmul(f32, f32, lists, count, block, 1.0, a_row_blocks=lists)
    with pytest.raises(ValueError, match="kept must have shape"):
        sparse_input_matmul(f32, f32, lists, count, block, 1.0, out=f32[:16].clone(), a_row_blocks=lists)


def test_the_first_config_untuned_matches_and_other_names_are_refused():
    torch.manual_seed(0)
    a, b = torch.randn(48, 64, device=DEVICE), torch.randn(64, 40, device=DEVICE)
    kept = torch.tensor([[1, 0], [0, 1], [1, 0]], dtype=torch.int32, device=DEVICE)
    count = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    first = sparse_input_matmul(a, b, kept, count, (16, 32), 1.0, config="first")
    assert torch.equal(first, sparse_input_matmul(a, b, kept, count, (16, 32), 1.0))
    with pytest.raises(ValueError, match='config must be a dict of kernel tiles, "first" or None'):
        sparse_input_matmul(a, b, kept, count, (16, 32), 1.0, config="fastest")
