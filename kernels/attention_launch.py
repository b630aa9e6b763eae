"""What the attention launchers share on the host: operand checks, head-dim padding, the
attention mask's broadcast strides, autotuning candidates fitted to the mask's block and to
the head dims, and the launch itself (an explicit config, the first candidate, or autotuning)."""

import os

import torch
import triton

from .runtime import (
    SHARED_MEMORY_BUDGET,
    SUPPORTED_DTYPES,
    TMA_MIN_BLOCK,
    autotuned,
    descriptor_memory,
    interpreting,
    start_address,
    traceable,
)

MAX_HEAD_DIM = 256
# Resident tiles (the rows a program keeps for its whole loop, beside their float32
# accumulators) of at most 64 KiB: 128 rows at 16-bit head dims 128 + 128, as the Triton
# tutorial's fused attention holds them; 64 rows at 256 + 256 or in float32. Counted in bytes
# because on an H200 (Triton 3.6) float32 at head dims 128 + 128 with 128 resident rows took
# 75 ms for a forward + backward that took 2.3 ms in bfloat16 (B, H, Lq, Lk = 2, 8, 777, 1000);
# the byte limit that halves those rows has not been timed there yet.
RESIDENT_BYTES = 1 << 16


def check_attention_operands(q, k, v, keep, mask_block, attn_mask):
    """q (B, H, Lq, E), k (B, Hk, Lk, E), v (B, Hk, Lk, Ev) of one supported dtype on one
    device, Hk dividing H, head dims at most MAX_HEAD_DIM; keep (B, H, cdiv(Lq, BM), cdiv(Lk,
    BN)) bool or uint8 for mask_block (BM, BN), powers of two >= 16; attn_mask None, or bool,
    float32 or q's dtype, broadcastable to (B, H, Lq, Lk). Returns (B, H, Hk, Lq, Lk, E, Ev)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("keep", keep)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported: float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    (B, H, Lq, E), (_, Hk, Lk, _), Ev = q.shape, k.shape, v.shape[3]
    if k.shape[0] != B or k.shape[3] != E or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if Hk == 0 or H % Hk:
        raise ValueError(f"k's {Hk} heads must divide q's {H}")
    if max(E, Ev) > MAX_HEAD_DIM:
        raise ValueError(f"head dims {E} and {Ev} must be at most {MAX_HEAD_DIM}")
    if any(side < 16 or side & (side - 1) for side in mask_block):
        raise ValueError(f"the mask's block sides must be powers of two >= 16, got {tuple(mask_block)}")
    grid = (B, H, triton.cdiv(Lq, mask_block[0]), triton.cdiv(Lk, mask_block[1]))
    if keep.dtype not in (torch.bool, torch.uint8) or tuple(keep.shape) != grid:
        raise ValueError(
            f"keep must be a bool or uint8 tile table of shape {grid}, got {keep.dtype} {tuple(keep.shape)}"
        )
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
            raise TypeError(f"attn_mask must be bool, float32 or q's dtype {q.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, H, Lq, Lk))
        except RuntimeError:
            raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to {(B, H, Lq, Lk)}") from None
    return B, H, Hk, Lq, Lk, E, Ev


def kernel_meta(operands, mask_block, attn_mask, is_causal, drop_keys, allow_tf32, tma, warp_specialize):
    """The meta-parameters the attention kernels share, for operands (q, k, v[, dO]) under
    mask_block: the mask's kind, the policy, the padded head dims, the dot's precision, and how
    the operands are read (_read_paths)."""
    q, v = operands[0], operands[2]
    return dict(
        HAS_MASK=attn_mask is not None,
        MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
        IS_CAUSAL=bool(is_causal),
        DROP_KEYS=bool(drop_keys),
        MASK_BM=mask_block[0],
        MASK_BN=mask_block[1],
        BLOCK_E=head_block(q.shape[3]),
        BLOCK_EV=head_block(v.shape[3]),
        INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
        **_read_paths(operands, mask_block, tma, warp_specialize),
    )


def _read_paths(operands, mask_block, tma, warp_specialize):
    """dict(TMA=, WARP_SPECIALIZE=): how the kernels read the operands. tma=None reads the
    SLICECOMPILE_ATTENTION_TMA environment variable ("1": on where the operands allow it), True
    insists (ValueError when they cannot be read that way), False never. warp_specialize=None reads
    SLICECOMPILE_ATTENTION_WS, which applies only where the TMA path runs; True needs that path.
    Both are off by default until a GPU run of the attention tests has checked them.
    On a GPU the TMA path also needs a mask block of at least TMA_MIN_BLOCK a side: with smaller
    kernel tiles Triton 3.6's pipeliner failed to compile the dK/dV kernel (H100, fp16, 64x32
    tiles), as it had failed the masked GEMMs' small TMA tiles."""
    wanted = os.environ.get("SLICECOMPILE_ATTENTION_TMA", "0") == "1" if tma is None else tma
    if wanted and not (all(map(_tma_readable, operands)) and (interpreting() or min(mask_block) >= TMA_MIN_BLOCK)):
        if tma:
            raise ValueError(
                "attention operands cannot be read by the tensor memory accelerator: each needs unit stride "
                "along the head dim and its other strides and start aligned to 16 bytes, and on a GPU the "
                f"mask's block {tuple(mask_block)} needs sides of at least {TMA_MIN_BLOCK}"
            )
        wanted = False
    if warp_specialize is None:
        warp_specialize = wanted and os.environ.get("SLICECOMPILE_ATTENTION_WS", "0") == "1"
    if warp_specialize and not wanted:
        raise ValueError("warp specialisation of the attention kernels needs the TMA path")
    if wanted and operands[0].is_cuda:
        triton.set_allocator(descriptor_memory)
    return dict(TMA=bool(wanted), WARP_SPECIALIZE=bool(warp_specialize))


def _tma_readable(t):
    """Whether each (batch, head) plane of 4-D t can be a tensor-memory-accelerator descriptor."""
    aligned = all(stride * t.element_size() % 16 == 0 for stride in t.stride()[:3])
    return t.stride(3) == 1 and aligned and start_address(t) % 16 == 0


def kept_tile_lists(keep, mask_block, lk, is_causal, by_columns=False):
    """The drop-keys kernels' loops: for each (batch, head) and each block-row of the tile table
    keep (B, H, R, C) (each block-column if by_columns), int32 [first, count, t_1 .. t_count, ...]:
    the kept tiles that the row's queries see at all (under is_causal), in ascending order, after
    two counts. The first `first` of them need no per-element test in the kernels' loops: for rows,
    the tiles wholly inside lk and (causal) wholly seen by the row's first query; for columns, the
    tiles that straddle the diagonal and need the test (none without causality). Laid out
    (B, H, R, 2 + C) or (B, H, C, 2 + R)."""
    bm, bn = mask_block
    rows = torch.arange(keep.shape[2], device=keep.device)[:, None]
    cols = torch.arange(keep.shape[3], device=keep.device)[None, :]
    seen = cols * bn <= rows * bm + bm - 1 if is_causal else torch.ones_like(rows * cols, dtype=torch.bool)
    if by_columns:
        first = seen & (rows * bm < cols * bn + bn - 1) if is_causal else torch.zeros_like(seen)
    else:
        first = ((cols + 1) * bn <= lk) & ((cols + 1) * bn - 1 <= rows * bm if is_causal else True)
    listed = keep.bool() & seen
    if by_columns:
        listed, first = listed.transpose(2, 3), first.t()
    n = listed.shape[3]
    index = torch.arange(n, device=keep.device)
    order = torch.where(listed, index, n + index).sort(dim=3).values
    counts = torch.stack([(listed & first).sum(3), listed.sum(3)], dim=3)
    return torch.cat([counts, order], dim=3).to(torch.int32)


def head_block(d):
    """A head dim padded to a power of two of at least 16 (what tl.dot needs)."""
    return max(16, triton.next_power_of_2(d))


def mask_view(attn_mask, shape):
    """(the pointer to pass, its 4 strides over shape (B, H, Lq, Lk), stride 0 on broadcast
    dims). Boolean masks are read as uint8."""
    if attn_mask is None:
        return None, (0, 0, 0, 0)
    # Converted, not viewed: Inductor (torch 2.11) cannot view bool as uint8.
    full = (attn_mask.to(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask).expand(shape)
    return full, full.stride()


def widened_for_interpreter(q):
    """The interpreter has no bfloat16 arithmetic and truncates float32 -> bfloat16 stores: there
    bfloat16 operands run in float32, and torch rounds the results."""
    return interpreting() and q.dtype == torch.bfloat16


def widen(t):
    return t if t is None or not t.is_floating_point() else t.float()


class AttentionKernel:
    """An attention kernel with its autotuning candidates: by_head_dim maps the largest padded head
    dim a list serves (64, 128, 256) to (BLOCK_M, BLOCK_N, warps, stages) tuples, best first.
    resident: the tile whose rows a program holds for its whole loop ("BLOCK_M" for the
    forward and dQ, "BLOCK_N" for dK/dV); the other is streamed. The kernel takes LQ_KEY,
    LK_KEY, BLOCK_E, BLOCK_EV, MASK_BM, MASK_BN, IS_CAUSAL, HAS_MASK, DROP_KEYS and TMA, its tuning key
    (with extra_key's meta-parameters)."""

    KEY = ["LQ_KEY", "LK_KEY", "BLOCK_E", "BLOCK_EV", "MASK_BM", "MASK_BN", "IS_CAUSAL", "HAS_MASK", "DROP_KEYS", "TMA"]

    def __init__(self, kernel, by_head_dim, resident, extra_key=()):
        self.kernel, self.resident = kernel, resident
        self.by_head_dim = {
            dim: [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s) for bm, bn, w, s in shapes]
            for dim, shapes in sorted(by_head_dim.items())
        }
        self.configs = list({str(c): c for shapes in self.by_head_dim.values() for c in shapes}.values())
        self.streamed = "BLOCK_N" if resident == "BLOCK_M" else "BLOCK_M"
        self.tuned = autotuned(kernel, self.configs, self.KEY + list(extra_key), self._prune)

    def candidates(self, element_size, block_e, block_ev, mask_block):
        """The fitted candidates for these head dims (padded) and this mask's block, best first."""
        width = max(block_e, block_ev)
        shapes = next((c for dim, c in self.by_head_dim.items() if width <= dim), list(self.by_head_dim.values())[-1])
        return self.fit(shapes, element_size, block_e, block_ev, mask_block)

    def _prune(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        sizes = (args["BLOCK_E"], args["BLOCK_EV"], (args["MASK_BM"], args["MASK_BN"]))
        return self.candidates(args["q_ptr"].element_size(), *sizes)

    def fit(self, configs, element_size, block_e, block_ev, mask_block):
        """configs with tiles shrunk to divide the mask's block (powers of two no larger than
        its sides), the resident tile to RESIDENT_BYTES, and the streamed tiles' pipeline to
        the shared-memory budget; duplicates removed, order kept."""
        width = block_e + block_ev
        fitted = {}
        for c in configs:
            tiles = {
                "BLOCK_M": min(c.kwargs["BLOCK_M"], mask_block[0]),
                "BLOCK_N": min(c.kwargs["BLOCK_N"], mask_block[1]),
            }
            while tiles[self.resident] > 16 and tiles[self.resident] * width * element_size > RESIDENT_BYTES:
                tiles[self.resident] //= 2
            while tiles[self.streamed] > 16 and tiles[self.streamed] * width * element_size > SHARED_MEMORY_BUDGET // 2:
                tiles[self.streamed] //= 2
            stage = tiles[self.streamed] * width * element_size
            stages = max(1, min(c.num_stages, SHARED_MEMORY_BUDGET // stage))
            key = (tiles["BLOCK_M"], tiles["BLOCK_N"], c.num_warps, stages)
            fitted.setdefault(key, triton.Config(tiles, num_warps=c.num_warps, num_stages=stages))
        return list(fitted.values())

    def launch(self, grid, config, mask_block, element_size, args, meta):
        """Launch over grid(tiles) (tiles: the BLOCK_M, BLOCK_N in use) with the positional args
        and the meta-parameters meta. config: dict(BLOCK_M=, BLOCK_N=, num_warps=, num_stages=),
        tiles dividing the mask's block; None: the interpreter's one config (the mask's block: it
        pays per program and loop step), SLICECOMPILE_AUTOTUNE=0's first fitted candidate, or
        autotuning."""
        if config is None and interpreting():
            config = dict(BLOCK_M=mask_block[0], BLOCK_N=mask_block[1], num_warps=4, num_stages=1)
        elif config is None and os.environ.get("SLICECOMPILE_AUTOTUNE", "1") == "0":
            first = self.candidates(element_size, meta["BLOCK_E"], meta["BLOCK_EV"], mask_block)[0]
            config = dict(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages)
        if config is None:
            traceable(self.tuned)[grid](*args, **meta)
            return
        tiles = (config["BLOCK_M"], config["BLOCK_N"])
        if any(t < 16 or side % t for t, side in zip(tiles, mask_block)):
            raise ValueError(f"kernel tiles {tiles} must be >= 16 and divide the mask's block {tuple(mask_block)}")
        traceable(self.kernel)[grid(config)](*args, **meta, **config)
