"""Device-side helpers shared by the kernels: program order, reading operand tiles (through the
tensor memory accelerator or through pointers) and writing output tiles."""

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
def operand(
    ptr,
    rows,
    cols,
    stride_r,
    stride_c,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    TMA: tl.constexpr,
):
    """What operand_tile reads a (rows, cols) matrix through: a tensor-memory-accelerator
    descriptor of (BLOCK_R, BLOCK_C) blocks if TMA (unit stride along cols, or along rows if
    TRANSPOSED), else the pointer itself."""
    if TMA:
        if TRANSPOSED:
            source = tl.make_tensor_descriptor(
                ptr, shape=[cols, rows], strides=[stride_c, 1], block_shape=[BLOCK_C, BLOCK_R]
            )
        else:
            source = tl.make_tensor_descriptor(
                ptr, shape=[rows, cols], strides=[stride_r, 1], block_shape=[BLOCK_R, BLOCK_C]
            )
    else:
        source = ptr
    return source


@triton.jit
def operand_tile(
    source,
    row,
    col,
    rows,
    cols,
    stride_r,
    stride_c,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    TMA: tl.constexpr,
):
    """The (BLOCK_R, BLOCK_C) block at (row, col) of a (rows, cols) matrix read through
    operand(...); zeros past the matrix's edges."""
    if TMA:
        if TRANSPOSED:
            block = source.load([col, row]).T
        else:
            block = source.load([row, col])
    else:
        offs_r = row + tl.arange(0, BLOCK_R)
        offs_c = col + tl.arange(0, BLOCK_C)
        ptrs = source + offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c
        block = tl.load(ptrs, mask=(offs_r[:, None] < rows) & (offs_c[None, :] < cols), other=0.0)
    return block


@triton.jit
def bias_row(bias_ptr, offs_n, N, live):
    """(1, BLOCK_N) float32 bias of the output columns offs_n; zeros where not live (a dropped
    tile drops its bias too)."""
    bias = tl.load(bias_ptr + offs_n, mask=(offs_n < N) & live, other=0.0)
    return bias.to(tl.float32)[None, :]


@triton.jit
def store_tile(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cn):
    """acc in c's dtype at rows offs_m, columns offs_n of c (M, N), inside its edges."""
    c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
