"""Compile every Triton kernel of slicecompile.kernels for Hopper (sm_90a) on a machine without a
GPU, at each autotuning candidate its launcher would try, and report what came out: registers per
thread, spilled bytes, shared memory, and whether the kernel uses wgmma, the tensor memory
accelerator (TMA) and warp specialisation (ws).

    python bench/inspect_kernels.py [--dtype bfloat16] [--kernels attention|gemm|all] [--csv PATH]
        [--head-dims 64 128] [--first] [--variants pointer tma tma_ws dropkey]

How: the public launchers run on fake CUDA tensors with runtime.traceable, the seam every launch
goes through, replaced by a recorder, and the GPU queries stubbed as an H100's (132
multiprocessors, compute capability 9.0). An autotuned launch yields its kernel's candidates as
the launcher's own prune fits them to the launch. Triton's binder (what JITFunction.run
specialises arguments with) turns each launch into triton.compile's signature, constants and
attributes for GPUTarget("cuda", 90, 32); Triton's bundled ptxas makes the cubin. Registers and
spills come from ptxas's log: CompiledKernel.n_regs and n_spills are filled in only when a GPU
loads the binary. Variants (env vars and launcher kwargs, VARIANTS) that change no launch are
reported as not there yet. tests/kernels/test_inspect_kernels.py asserts on the first candidates.

Needs TRITON_INTERPRET unset: triton.jit reads it as the kernels are imported.
"""

import argparse
import contextlib
import csv
import io
import os
import re
import sys
import time
from collections import namedtuple
from types import SimpleNamespace
from unittest import mock

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import MockTensor, create_function_from_signature, mangle_type

from slicecompile import kernels
from slicecompile.kernels import attention_launch, runtime

HOPPER = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(HOPPER)
VERSIONS = dict(triton=triton.__version__, ptxas=get_ptxas(HOPPER.arch).version)
H100 = SimpleNamespace(name="NVIDIA H100 (stub)", major=9, minor=0, multi_processor_count=132)

HEAD_DIMS = (64, 128)
ATTENTION_SHAPE = (4, 16, 4096)  # batch, heads, sequence length
GEMM_SHAPE = (8192, 4096, 4096)  # M, K, N
BLOCK = (128, 128)  # the mask's block, for attention and the GEMMs alike
P = 0.5

# Set (or, as None, unset) while every launch is recorded: every candidate config, and TMA allowed.
BASE_ENV = {
    "SLICECOMPILE_AUTOTUNE": "1",
    "SLICECOMPILE_TMA": "1",
    "SLICECOMPILE_ATTENTION_TMA": None,
    "SLICECOMPILE_ATTENTION_WS": None,
}
Variant = namedtuple("Variant", "env kwargs")  # env vars and launcher kwargs while recording
VARIANTS = {
    "attention": {
        "pointer": Variant({}, {}),
        "tma": Variant({"SLICECOMPILE_ATTENTION_TMA": "1"}, {}),
        "tma_ws": Variant({"SLICECOMPILE_ATTENTION_TMA": "1", "SLICECOMPILE_ATTENTION_WS": "1"}, {}),
        "dropkey": Variant({}, {"drop_keys": True}),
    },
    "gemm": {"pointer": Variant({}, {"tma": False}), "tma": Variant({}, {"tma": True})},
}
Launch = namedtuple("Launch", "kernel args meta")
FIELDS = ["kernel", "variant", "dtype", "shape", "candidate", "config", "warps", "stages", "regs", "spill_stores"]
FIELDS += ["spill_loads", "smem_kb", "wgmma", "tma", "ws", "seconds", "note", "triton", "ptxas"]


def _empty(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="cuda")


def attention_forward(dtype, head_dim, **kwargs):
    batch, heads, length = ATTENTION_SHAPE
    q, k, v = (_empty(batch, heads, length, head_dim, dtype=dtype) for _ in range(3))
    keep = _empty(batch, heads, length // BLOCK[0], length // BLOCK[1], dtype=torch.bool)
    kernels.attention_forward(q, k, v, keep, BLOCK, 1 / (1 - P), head_dim**-0.5, **kwargs)


def attention_backward(dtype, head_dim, **kwargs):
    batch, heads, length = ATTENTION_SHAPE
    q, k, v, out, grad = (_empty(batch, heads, length, head_dim, dtype=dtype) for _ in range(5))
    lse = _empty(batch, heads, length, dtype=torch.float32)
    keep = _empty(batch, heads, length // BLOCK[0], length // BLOCK[1], dtype=torch.bool)
    kernels.attention_backward(grad, q, k, v, out, lse, keep, BLOCK, 1 / (1 - P), head_dim**-0.5, **kwargs)


def input_dropout_forward(dtype, head_dim, **kwargs):
    """(X ⊙ mask) @ Wᵀ + bias, X's kept K-tiles listed per block-row."""
    M, K, N = GEMM_SHAPE
    x, w, bias = _empty(M, K, dtype=dtype), _empty(N, K, dtype=dtype), _empty(N, dtype=dtype)
    kept = _empty(M // BLOCK[0], int(K // BLOCK[1] * (1 - P)), dtype=torch.int32)
    count = _empty(M // BLOCK[0], dtype=torch.int32)
    kernels.sparse_input_matmul(x, w.t(), kept, count, BLOCK, 1 / (1 - P), bias=bias, **kwargs)


def output_dropout_forward(dtype, head_dim, **kwargs):
    """(X @ Wᵀ + bias) ⊙ mask, a keep table of output tiles."""
    M, K, N = GEMM_SHAPE
    x, w, bias = _empty(M, K, dtype=dtype), _empty(N, K, dtype=dtype), _empty(N, dtype=dtype)
    keep = _empty(M // BLOCK[0], N // BLOCK[1], dtype=torch.uint8)
    kernels.sparse_output_matmul(x, w.t(), keep, BLOCK, 1 / (1 - P), bias=bias, **kwargs)


CASES = {"attention": [attention_forward, attention_backward], "gemm": [input_dropout_forward, output_dropout_forward]}


class _Seam:
    """Stands in for runtime.traceable(kernel): kernel[grid](*args, **meta) is recorded, not run."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append(Launch(self.kernel, args, meta))


@contextlib.contextmanager
def _recording(env):
    """Yields the list that the launches made inside are appended to: on fake CUDA tensors of a
    stub H100, under env on top of BASE_ENV. Patches each kernels module that imported the seams."""
    launches = []
    stand_ins = [
        (runtime.traceable, lambda kernel: _Seam(kernel, launches)),
        (runtime.multiprocessors, lambda: H100.multi_processor_count),
        (runtime._device_properties, lambda index=None: H100),
        (attention_launch.kept_tile_lists, _kept_tile_lists),
    ]
    modules = [m for name, m in list(sys.modules.items()) if name.startswith(kernels.__name__)]
    with contextlib.ExitStack() as stack, mock.patch.dict(os.environ):
        for name, value in {**BASE_ENV, **env}.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module in modules:
            for attr, value in list(vars(module).items()):
                for original, stand_in in stand_ins:
                    if value is original:
                        stack.enter_context(mock.patch.object(module, attr, stand_in))
        with FakeTensorMode():
            yield launches


def _kept_tile_lists(keep, mask_block, lk, is_causal, by_columns=False):
    """The lists' shape and dtype: fake CUDA tensors cannot be made by torch.arange on a build
    without CUDA, and the kernels' compilation needs no more."""
    B, H, R, C = keep.shape
    return torch.empty((B, H, C, 2 + R) if by_columns else (B, H, R, 2 + C), dtype=torch.int32, device=keep.device)


def _mock(arg):
    """A tensor as Triton's MockTensor (its dtype, a 16-byte aligned address); the rest as is."""
    return MockTensor(arg.dtype) if isinstance(arg, torch.Tensor) else arg


def _identity(launch):
    """What makes two launches the same kernel: its name, argument types and meta-parameters."""
    fn = launch.kernel.fn if isinstance(launch.kernel, Autotuner) else launch.kernel
    return fn.__name__, [mangle_type(_mock(arg)) for arg in launch.args], sorted(launch.meta.items())


def candidates(launch):
    """(the triton.jit kernel, its configs as launch kwargs): an autotuned launch's candidates after
    its early_config_prune (how the launchers fit them to the mask's block and head dims); a plain
    launch's one config, which its meta-parameters already hold."""
    tuner = launch.kernel
    if not isinstance(tuner, Autotuner):
        return tuner, [{}]
    configs = tuner.configs
    if tuner.early_config_prune:
        configs = tuner.early_config_prune(configs, dict(zip(tuner.arg_names, launch.args)), **launch.meta)
    return tuner.fn, [config.all_kwargs() for config in configs]


def compile_for_hopper(fn, args, kwargs):
    """(CompiledKernel, ptxas's log, seconds) of fn launched with args and kwargs, for sm_90a."""
    binder = create_function_from_signature(fn.signature, fn.params, BACKEND)
    bound, specialization, options = binder(*map(_mock, args), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(BACKEND, kwargs, bound, specialization, options)
    log, start = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(log):  # dump_ptxas_log prints it
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=HOPPER, options=options.__dict__)
    return compiled, log.getvalue(), time.perf_counter() - start


def _usage(compiled, log):
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    ptx = compiled.asm["ptx"]
    return dict(
        warps=compiled.metadata.num_warps,
        stages=compiled.metadata.num_stages,
        regs=int(regs[1]) if regs else None,
        spill_stores=int(spills[1]) if spills else None,
        spill_loads=int(spills[2]) if spills else None,
        smem_kb=round(compiled.metadata.shared / 1024, 1),
        wgmma="wgmma.mma_async" in ptx,
        tma="cp.async.bulk.tensor" in ptx,
        ws="ttg.warp_specialize" in compiled.asm["ttgir"],
    )


def _config_name(config):
    tiles = "x".join(str(config[name]) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if name in config)
    return (tiles or "fixed") + (" persistent" if config.get("PERSISTENT") else "")


def _error(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _inspect_launch(launch, first_only, row):
    fn, configs = candidates(launch)
    rows = []
    for index, config in enumerate(configs[:1] if first_only else configs):
        entry = dict(row, kernel=fn.__name__.removesuffix("_kernel"), candidate=index, config=_config_name(config))
        try:
            compiled, log, seconds = compile_for_hopper(fn, launch.args, {**launch.meta, **config})
            entry.update(_usage(compiled, log), seconds=round(seconds, 1))
        except Exception as e:  # one config that fails to compile is a finding, not the end
            entry["note"] = _error(e)
        rows.append(entry)
    return rows


def _inspect_case(case, group, dtype, head_dim, first_only, variants):
    """Rows of case's launches under each of its group's variants (or those named in variants).
    A variant whose launches are the first variant's is reported as not there yet."""
    shape = f"E={head_dim}" if group == "attention" else "x".join(map(str, GEMM_SHAPE))
    rows, baseline = [], None
    for name, variant in VARIANTS[group].items():
        row = dict(kernel=case.__name__, variant=name, dtype=str(dtype).removeprefix("torch."), shape=shape, **VERSIONS)
        try:
            with _recording(variant.env) as launches:
                case(dtype, head_dim, **variant.kwargs)
        except Exception as e:
            rows.append(dict(row, note=f"not recorded: {_error(e)}"))
            continue
        identities = [_identity(launch) for launch in launches]
        unchanged = baseline is not None and identities == baseline
        baseline = identities if baseline is None else baseline
        if variants is not None and name not in variants:
            continue
        if unchanged:
            rows.append(dict(row, note="changes no launch: not there yet"))
            continue
        for launch in launches:
            rows.extend(_inspect_launch(launch, first_only, row))
    return rows


def inspect(dtype=torch.bfloat16, groups=("attention", "gemm"), head_dims=HEAD_DIMS, first_only=False, variants=None):
    """Rows (dicts of FIELDS) for each kernel, variant, shape and candidate config in groups
    ("attention", "gemm"); first_only: each launch's first fitted candidate only (what
    SLICECOMPILE_AUTOTUNE=0 runs); variants: the names in VARIANTS to compile (None: all)."""
    if runtime.interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 makes the kernels interpreter functions: run without it")
    rows = []
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True  # registers and spills: only ptxas says, without a GPU
        knobs.compilation.always_compile = True  # a cached kernel has no log
        for group in groups:
            for case in CASES[group]:
                for head_dim in head_dims if group == "attention" else [None]:
                    rows.extend(_inspect_case(case, group, dtype, head_dim, first_only, variants))
    return rows


# (header, row key, width) of the printed table; the CSV has every field.
COLUMNS = [("kernel", "kernel", 21), ("variant", "variant", 7), ("shape", "shape", 14), ("config", "config", 21)]
COLUMNS += [("warps", "warps", 5), ("stages", "stages", 6), ("regs", "regs", 4), ("spills", "spill_stores", 6)]
COLUMNS += [("smem KB", "smem_kb", 7), ("wgmma", "wgmma", 5), ("tma", "tma", 5), ("ws", "ws", 5)]
COLUMNS += [("s", "seconds", 4)]


def print_table(rows):
    print(f"sm_90a, triton {VERSIONS['triton']}, ptxas {VERSIONS['ptxas']}; spills: bytes ptxas stores to local memory")
    print(" ".join(header.ljust(width) for header, _, width in COLUMNS), "note")
    for row in rows:
        cells = ("" if row.get(key) is None else str(row[key]) for _, key, _ in COLUMNS)
        print(" ".join(cell.ljust(width) for cell, (_, _, width) in zip(cells, COLUMNS)), row.get("note") or "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--kernels", default="all", choices=["attention", "gemm", "all"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=HEAD_DIMS)
    parser.add_argument("--first", action="store_true", help="each launch's first fitted candidate only")
    names = sorted({name for group in VARIANTS.values() for name in group})
    parser.add_argument("--variants", nargs="+", choices=names, default=None, help="only these (default: all)")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV")
    args = parser.parse_args()
    groups = list(VARIANTS) if args.kernels == "all" else [args.kernels]
    rows = inspect(getattr(torch, args.dtype), groups, args.head_dims, args.first, args.variants)
    print_table(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
