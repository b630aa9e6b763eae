"""Device-side helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile number tile_id as (pid_m, pid_n), in grouped order: GROUP_M tile-rows are swept
    column by column so that consecutive tiles share A and B tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (tile_id // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group_size) % rows_in_group
    pid_n = (tile_id % group_size) // rows_in_group
    return pid_m, pid_n


@triton.jit
def block_descriptor(ptr, rows, cols, stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TRANSPOSED: tl.constexpr):
    """A tensor-memory-accelerator descriptor of (BLOCK_R, BLOCK_C) blocks of a (rows, cols) matrix
    with unit stride along cols, or, if TRANSPOSED, along rows; stride is the other one. Reads
    past the edges return zeros, so ragged shapes need no masks."""
    if TRANSPOSED:
        desc = tl.make_tensor_descriptor(ptr, shape=[cols, rows], strides=[stride, 1], block_shape=[BLOCK_C, BLOCK_R])
    else:
        desc = tl.make_tensor_descriptor(ptr, shape=[rows, cols], strides=[stride, 1], block_shape=[BLOCK_R, BLOCK_C])
    return desc


@triton.jit
def load_block(desc, row, col, TRANSPOSED: tl.constexpr):
    """The block at (row, col) of the matrix that block_descriptor(..., TRANSPOSED) describes."""
    if TRANSPOSED:
        block = desc.load([col, row]).T
    else:
        block = desc.load([row, col])
    return block
