"""What every launcher needs: operand checks and the CPU interpreter's dtype limits."""

import contextlib
import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def traceable(kernel):
    """The kernel wrapped so that torch.compile can trace its launch (torch.library.wrap_triton)
    and Inductor can launch it from compiled code; called outside tracing, it simply runs.
    The interpreter's kernels cannot be wrapped: they are launched directly."""
    return kernel if interpreting() else torch.library.wrap_triton(kernel)


def check_matmul_operands(a, b):
    """a (M, K) @ b (K, N): 2-D, one floating dtype, one device."""
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
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner sizes differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")


@contextlib.contextmanager
def run_in_interpreter_dtype(out, *inputs):
    """Yield (out, *inputs) to launch with. The interpreter has no bfloat16 arithmetic and
    truncates float32 -> bfloat16 stores, so there bfloat16 runs in float32 and the result
    is rounded into `out` by torch on exit. Elsewhere everything passes through untouched."""
    if not (interpreting() and out.dtype == torch.bfloat16):
        yield (out, *inputs)
        return
    wide = [None if t is None else t.float() for t in inputs]
    out32 = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    yield (out32, *wide)
    out.copy_(out32)
