"""Device-side helpers shared by the block-dropout attention kernels: reading (rows, head dim)
tiles, the scores of a (query tile, key tile) pair under the causal rule and an attention mask,
and whether the tile table keeps a kernel tile.

Scores are kept in base-2 units (natural scores times log2(e)), so the kernels exponentiate
with exp2; the log-sum-exp they save per query row is in natural units."""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def load_tile(ptr, offs_r, offs_c, n_r, n_c, stride_r, stride_c):
    """The (len(offs_r), len(offs_c)) tile of a (n_r, n_c) matrix at ptr with strides
    (stride_r, stride_c); zeros past its edges. Swapping the roles of rows and columns reads the
    transposed tile."""
    ptrs = ptr + offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c
    return tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)


@triton.jit
def transposed_tile(
    source, start, n_r, n_c, stride_r, stride_c, ROWS: tl.constexpr, COLS: tl.constexpr, TMA: tl.constexpr
):
    """Rows [start, start + ROWS) of a (n_r, n_c) matrix read through tiling.operand (a descriptor
    of (ROWS, COLS) blocks if TMA, else a pointer), as a (COLS, ROWS) tile; zeros past its edges.
    Pointers read it transposed directly: loading it upright and transposing it in registers cost
    the dK/dV kernel spills (sm_90 compile, Triton 3.7: 684 against 8 bytes at head dim 64)."""
    if TMA:
        tile = tl.trans(source.load([start, 0]))
    else:
        tile = load_tile(source, tl.arange(0, COLS), start + tl.arange(0, ROWS), n_c, n_r, stride_c, stride_r)
    return tile


@triton.jit
def store_tile(ptr, value, offs_r, offs_c, n_r, n_c, stride_r, stride_c):
    """value in ptr's dtype at rows offs_r, columns offs_c of a (n_r, n_c) matrix, inside its edges."""
    ptrs = ptr + offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c))


@triton.jit
def scores(
    a,
    b,
    offs_m,
    offs_n,
    LQ,
    LK,
    qk_scale,
    mask_ptr,
    stride_mm,
    stride_mn,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EDGE: tl.constexpr = True,
    TRANSPOSED: tl.constexpr = False,
):
    """(BLOCK_M, BLOCK_N) float32 scores a @ b * qk_scale (+ mask * log2(e)) of queries offs_m
    against keys offs_n, in base-2 units; -inf where a key is past LK, hidden by the causal rule
    (query i sees keys j <= i), or False in a boolean mask. a: the (BLOCK_M, BLOCK_E) query tile,
    b: the (BLOCK_E, BLOCK_N) key tile transposed, qk_scale = scale * log2(e); TRANSPOSED: their
    transpose, a the key tile and b the query tile transposed, giving the (BLOCK_N, BLOCK_M) scores
    transposed. mask_ptr points at this (batch, head)'s (LQ, LK) plane of the attention mask
    (broadcast dims have stride 0).
    EDGE=False leaves out the per-element causal and edge tests: the caller knows that under
    IS_CAUSAL every query of the tile sees every key of it, and that keys past LK either do not
    occur (key_tiles) or only give rows of dK and dV that are never stored (query_tiles)."""
    s = tl.dot(a, b, input_precision=INPUT_PRECISION) * qk_scale
    if not EDGE and not HAS_MASK:
        return s
    if TRANSPOSED:
        m, n = offs_m[None, :], offs_n[:, None]
    else:
        m, n = offs_m[:, None], offs_n[None, :]
    live = (n < LK) & (m >= 0)
    if IS_CAUSAL and EDGE:
        live = live & (m >= n)
    if HAS_MASK:
        ptrs = mask_ptr + m.to(tl.int64) * stride_mm + n.to(tl.int64) * stride_mn
        if MASK_BOOL:
            live = live & (tl.load(ptrs, mask=(m < LQ) & (n < LK), other=0) != 0)
        else:
            s += tl.load(ptrs, mask=(m < LQ) & (n < LK), other=0.0).to(tl.float32) * LOG2E
    return tl.where(live, s, float("-inf"))


@triton.jit
def tile_kept(keep_ptr, start_m, start_n, stride_keep_m, stride_keep_n, MASK_BM: tl.constexpr, MASK_BN: tl.constexpr):
    """Whether the semantic (MASK_BM, MASK_BN) tile that holds the kernel tile at (start_m,
    start_n) is kept. keep_ptr points at this (batch, head)'s tile table, uint8. The kernel's
    tiles divide the semantic block, so a kernel tile lies in exactly one semantic tile."""
    flag = tl.load(keep_ptr + (start_m // MASK_BM) * stride_keep_m + (start_n // MASK_BN) * stride_keep_n)
    return flag != 0


@triton.jit
def listed_bounds(line, stride, MASK_B: tl.constexpr):
    """(first, end) of a loop over a kept-tile list (attention_launch.kept_tile_lists) at line,
    entries stride apart: the loop runs over positions [0, end) of the listed tiles laid side by
    side, MASK_B per tile, the first loop over [0, first)."""
    return tl.load(line) * MASK_B, tl.load(line + stride) * MASK_B


@triton.jit
def listed_tile(line, position, stride, MASK_B: tl.constexpr):
    """Where position (see listed_bounds) lies in the (query or key) sequence: in listed tile
    position // MASK_B, at offset position % MASK_B."""
    return tl.load(line + (2 + position // MASK_B) * stride) * MASK_B + position % MASK_B


@triton.jit
def query_tile(IS_CAUSAL: tl.constexpr):
    """The query tile of a program whose grid's first axis runs over query tiles. Under IS_CAUSAL
    the last tiles, which see the most keys, come first, so that the shortest programs fill the
    end of the launch instead of the longest."""
    if IS_CAUSAL:
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        tile = tl.program_id(0)
    return tile


@triton.jit
def key_tiles(start_m, LK, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(inner_end, end): the key tiles a query tile at start_m visits are [0, end) in steps of
    BLOCK_N; those before inner_end lie wholly inside LK and, under IS_CAUSAL, wholly at or left of
    the tile's first query (every query of the tile sees every key of the tile), so they need no
    per-element causal or edge test. The tiles from inner_end to end are the diagonal and ragged ones."""
    if IS_CAUSAL:
        end = tl.minimum(LK, start_m + BLOCK_M)
        inner_end = tl.minimum((start_m + 1) // BLOCK_N, LK // BLOCK_N) * BLOCK_N
    else:
        end = LK
        inner_end = (LK // BLOCK_N) * BLOCK_N
    return inner_end, end


@triton.jit
def query_tiles(start_n, LQ, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(start, inner_start): the query tiles that see the key tile at start_n are [start, LQ) in
    steps of BLOCK_M; under IS_CAUSAL those from inner_start on see every key of the tile (no
    per-element causal test), those before it straddle the diagonal. Query rows past LQ need no
    test: their log-sum-exp is +inf, so their recomputed P is 0; nor do keys past LK of a ragged
    key tile: their P is garbage, but only their own rows of dK and dV see it, which are not stored."""
    if IS_CAUSAL:
        start = (start_n // BLOCK_M) * BLOCK_M
        inner_start = tl.maximum(start, tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M)
    else:
        start = 0
        inner_start = 0
    return start, inner_start
