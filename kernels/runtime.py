"""What every launcher needs: the CPU interpreter's dtype limits, autotuning, launch grids, and
whether operands can be read by the tensor memory accelerator."""

import contextlib
import functools
import os

import torch
import triton
from torch._subclasses.fake_tensor import is_fake

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def traceable(kernel):
    """The kernel wrapped so that torch.compile can trace its launch (torch.library.wrap_triton)
    and Inductor can launch it from compiled code; called outside tracing, it simply runs.
    The interpreter's kernels cannot be wrapped: they are launched directly."""
    return kernel if interpreting() else torch.library.wrap_triton(kernel)


@contextlib.contextmanager
def run_in_interpreter_dtype(out, *inputs):
    """Yield (out, *inputs) to launch with. The interpreter has no bfloat16 arithmetic and
    truncates float32 -> bfloat16 stores, so there bfloat16 inputs run in float32, and a
    bfloat16 out is computed in float32 and rounded into `out` by torch on exit. Elsewhere
    everything passes through untouched."""
    tensors = [t for t in (out, *inputs) if t is not None]
    if not (interpreting() and any(t.dtype == torch.bfloat16 for t in tensors)):
        yield (out, *inputs)
        return
    wide = [None if t is None else t.float() for t in inputs]
    if out.dtype != torch.bfloat16:
        yield (out, *wide)
        return
    out32 = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    yield (out32, *wide)
    out.copy_(out32)


def size_key(n):
    """An autotuning key for a size: n rounded up to a power of two, so that dynamic shapes
    share tuning results within a factor of two. Symbolic sizes (while torch.compile traces)
    get 0: compiled code tunes its kernels itself."""
    return 1 << max(n - 1, 0).bit_length() if isinstance(n, int) else 0


def autotuned(kernel, configs, key, prune):
    """kernel under triton.autotune over the candidate configs; prune(configs, named_args,
    **kwargs) fits them to the launch, and results are cached on disk (Triton's cache
    directory), so the next process reuses them. None under the interpreter, which runs one
    explicit config (Triton cannot benchmark there)."""
    if interpreting():
        return None
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune}, cache_results=True)(kernel)


# Operand buffers in shared memory: a pipeline of num_stages keeps num_stages - 1 stages' tiles.
# Under Hopper's 227 KB per multiprocessor, with room for the epilogue.
SHARED_MEMORY_BUDGET = 200 * 1024


def fit_to_mask(configs, named_args, **limits):
    """configs with each named tile shrunk to its limit (a power of two, like the tiles, so a
    shrunk tile still divides the mask's block), and pipelines shortened so that the operand
    buffers of a's dtype (float32 needs twice bfloat16's) fit in shared memory; duplicates
    removed, order kept."""
    element_size = getattr(named_args.get("a_ptr"), "element_size", lambda: 4)()
    fitted = {}
    for c in configs:
        kwargs = {**c.kwargs, **{name: min(c.kwargs[name], limit) for name, limit in limits.items()}}
        stage = (kwargs["BLOCK_M"] + kwargs["BLOCK_N"]) * kwargs["BLOCK_K"] * element_size
        while kwargs["BLOCK_K"] > 16 and 2 * stage > SHARED_MEMORY_BUDGET:
            kwargs["BLOCK_K"] //= 2
            stage //= 2
        stages = max(2, min(c.num_stages, SHARED_MEMORY_BUDGET // stage + 1))
        fitted.setdefault((tuple(sorted(kwargs.items())), c.num_warps, stages), (kwargs, c.num_warps, stages))
    return [triton.Config(kwargs, num_warps=warps, num_stages=stages) for kwargs, warps, stages in fitted.values()]


def launch_config(kernel, tuned, config, tile_names, mask_block, M, N, persistent, a, splits=1):
    """(launchable, grid, meta-parameters) for kernel on operand a: with an explicit config, or
    config="first" or SLICECOMPILE_AUTOTUNE=0 (the first candidate, fitted), the plain kernel, whose tiles
    must divide the mask's block; otherwise the autotuned one. A kernel that can be persistent
    (persistent=True) gets at most one program per multiprocessor unless its config sets
    PERSISTENT=False; other kernels get one program per output tile and split of the reduction
    (splits)."""
    if isinstance(config, str) and config != "first":
        raise ValueError(f'config must be a dict of kernel tiles, "first" or None, got {config!r}')
    if config == "first" or (config is None and os.environ.get("SLICECOMPILE_AUTOTUNE", "1") == "0"):
        (first,) = fit_to_mask(tuned.configs[:1], {"a_ptr": a}, **dict(zip(tile_names, mask_block)))
        config = dict(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages)
    if config is not None:
        config = dict(config)
        config["PERSISTENT"] = config.get("PERSISTENT", True) and persistent
        if any(side % config[name] for name, side in zip(tile_names, mask_block)):
            raise ValueError(f"kernel tiles {config} must divide the mask's block {mask_block}")
    programs = multiprocessors() if persistent and not interpreting() else None

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]) * splits
        if programs is None or not meta.get("PERSISTENT", True):
            return (tiles,)
        return (torch.sym_min(tiles, programs),)

    if config is not None:
        return traceable(kernel), grid(config), config
    return traceable(tuned), grid, {}


def multiprocessors():
    return _device_properties(torch.cuda.current_device()).multi_processor_count


def _device_properties(index):
    """index None: the current GPU."""
    return _properties_of(torch.cuda.current_device() if index is None else index)


@functools.cache
def _properties_of(index):
    """Read once per GPU: the launchers consult it on every call."""
    return torch.cuda.get_device_properties(index)


TMA_MIN_BLOCK = 128


def operand_layouts(a, b, tma, mask_block):
    """How the kernels read a (M, K) @ b (K, N): (use_tma, a_t, b_t). a_t says a has unit stride
    along M rather than K, b_t that b has it along K rather than N (the TMA kernels need one unit
    stride per operand; the pointer kernels take any strides, and a_t, b_t only key their tuning).
    tma=None uses the tensor memory accelerator on GPUs that have it (compute capability 9.0
    and newer) for 16-bit operands; tma=True insists (ValueError when the operands cannot be
    read that way); False never uses it. The TMA kernels' tiles are 128 on a side (smaller ones
    hit compiler failures on an H200 with Triton 3.6), so the mask's block must be at least
    that. SLICECOMPILE_TMA=0 turns it off everywhere (the portable kernels then run on every GPU)."""
    layouts = _tma_layouts(a, b, tma, mask_block)
    if layouts is None:
        return False, a.stride(0) == 1, b.stride(0) == 1
    return True, *layouts


def _tma_layouts(a, b, tma, mask_block):
    """(a_t, b_t) if the tensor memory accelerator reads the operands (see operand_layouts), else None."""
    if tma is False or os.environ.get("SLICECOMPILE_TMA", "1") == "0":
        return None
    layouts = [_unit_stride_dim(t) for t in (a, b)]
    usable = None not in layouts and min(mask_block) >= TMA_MIN_BLOCK
    if tma is None:
        fast = a.is_cuda and a.element_size() == 2 and _device_properties(a.device.index).major >= 9
        if not (fast and usable):
            return None
    elif not usable:
        raise ValueError(
            "operands cannot be read by the tensor memory accelerator: each needs a unit stride, "
            f"its other stride and its start aligned to 16 bytes, and the mask's block {tuple(mask_block)} "
            f"needs sides of at least {TMA_MIN_BLOCK}"
        )
    if a.is_cuda:
        triton.set_allocator(descriptor_memory)
    return layouts[0] == 0, layouts[1] == 0


def _unit_stride_dim(t):
    """The dim of 2-D t along which it has unit stride, if its other stride and its start are
    16-byte aligned (what tensor-memory-accelerator descriptors need); else None."""
    if start_address(t) % 16:
        return None
    for dim in (1, 0):
        if t.stride(dim) == 1 and (t.stride(1 - dim) * t.element_size()) % 16 == 0:
            return dim
    return None


def start_address(t):
    """t's first element's address, or for a fake or meta tensor (while torch.compile traces) its
    offset in bytes into its storage: what tensor-memory-accelerator alignment is judged on."""
    return t.storage_offset() * t.element_size() if is_fake(t) or t.device.type == "meta" else t.data_ptr()


def descriptor_memory(size, alignment, stream):
    """Global memory for tensor descriptors that kernels create on the device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")
