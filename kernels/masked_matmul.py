"""What the masked GEMMs share on the host: operand checks, the output, the choice between the
TMA and the pointer path, autotuning and the launch. Each kernel file adds its own loop and the
checks of its own mask."""

import torch

from .runtime import (
    SUPPORTED_DTYPES,
    autotuned,
    fit_to_mask,
    interpreting,
    launch_config,
    operand_layouts,
    run_in_interpreter_dtype,
    size_key,
)


def check_operands(a, b, bias, out, inner=None, rows=None, cols=None):
    """a (M, K) @ b (K, N): 2-D, one floating dtype, one device; bias (N,) and out (M, N) if
    given. Where C is not (M, N): inner, a's columns where they are not b's rows (a compact
    along K); rows and cols, C's where they are not a's rows and b's columns. Returns (C's rows,
    b's rows, C's columns)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    if inner is None and a.shape[1] != b.shape[0]:
        raise ValueError(f"inner sizes differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    if inner is not None and a.shape[1] != inner:
        raise ValueError(f"a must have {inner} columns (compact along K), got shape {tuple(a.shape)}")
    M, K, N = a.shape[0] if rows is None else rows, b.shape[0], b.shape[1] if cols is None else cols
    if bias is not None and bias.shape != (b.shape[1],):
        raise ValueError(f"bias must have shape ({b.shape[1]},), got {tuple(bias.shape)}")
    if out is not None and out.shape != (M, N):
        raise ValueError(f"out must have shape ({M}, {N}), got {tuple(out.shape)}")
    return M, K, N


class MaskedMatmul:
    """A masked-GEMM kernel with its autotuning candidates for each path. The kernel's signature:
    a, b, c, bias, *mask tensors, M, N, K (C's rows and columns, b's rows), M_KEY, N_KEY, K_KEY,
    *its own operand sizes, a's, b's and c's strides, *mask strides, scale, then A_T, B_T, the
    mask's block (mask_names), the tiles, GROUP_M, HAS_BIAS, its modes (mode_names),
    INPUT_PRECISION, TMA and PERSISTENT.

    configs(tma): the autotuning candidates of each path; tile_names: the kernel tiles that must
    divide the mask's block, e.g. ("BLOCK_M", "BLOCK_K"); mask_names: the meta-parameters that
    hold the mask's block, e.g. ("MASK_BM", "MASK_BK"); interpreter_tiles(mask_block): the one
    config the interpreter runs; mode_names: boolean meta-parameters that change how the mask is
    read, part of the tuning key."""

    def __init__(self, kernel, configs, tile_names, mask_names, interpreter_tiles, mode_names=()):
        self.kernel, self.tile_names, self.mask_names = kernel, tile_names, mask_names
        self.interpreter_tiles = interpreter_tiles
        key = ["M_KEY", "N_KEY", "K_KEY", "A_T", "B_T", *mask_names, *mode_names]
        self.tuned = {tma: autotuned(kernel, configs(tma), key, self._fit) for tma in (False, True)}

    def _fit(self, configs, named_args, **kwargs):
        return fit_to_mask(configs, named_args, **{t: kwargs[m] for t, m in zip(self.tile_names, self.mask_names)})

    def __call__(
        self,
        a,
        b,
        mask,
        mask_strides,
        mask_block,
        scale,
        bias,
        out,
        allow_tf32,
        config,
        tma,
        shape,
        sizes,
        modes,
    ):
        """scale * a @ b (+ bias) under the mask (its tensors and their strides) into out (a new
        tensor of C's shape (rows, cols) and a's dtype if None); sizes: the kernel's own operand
        sizes, modes: its mode flags (SPLIT_K, where a kernel has it, is its programs per output
        tile). Returns out."""
        (M, N), K = shape, b.shape[0]
        splits = modes.get("SPLIT_K", 1)
        if out is None:
            out = torch.empty((M, N), device=a.device, dtype=a.dtype)
        with run_in_interpreter_dtype(out, a, b, bias) as (out_, a, b, bias):
            use_tma, a_t, b_t = operand_layouts(a, b, tma, mask_block)
            if interpreting() and config in (None, "first"):
                config = self.interpreter_tiles(mask_block)
            launch, grid, meta = launch_config(
                self.kernel, self.tuned[use_tma], config, self.tile_names, mask_block, M, N, use_tma, a, splits
            )
            launch[grid](
                a,
                b,
                out_,
                bias,
                *mask,
                M,
                N,
                K,
                size_key(M),
                size_key(N),
                size_key(K),
                *sizes,
                a.stride(0),
                a.stride(1),
                b.stride(0),
                b.stride(1),
                out_.stride(0),
                out_.stride(1),
                *mask_strides,
                float(scale),
                A_T=a_t,
                B_T=b_t,
                **dict(zip(self.mask_names, mask_block)),
                HAS_BIAS=bias is not None,
                **modes,
                INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
                TMA=use_tma,
                **meta,
            )
        return out
