"""Triton kernels and their launchers (installed as `slicecompile.kernels`).

Masked-GEMM primitives, each usable in several roles by permuting operands:
- sparse_input_matmul: block-sparse A @ dense B -> dense C (skips dropped K-tiles);
- sparse_output_matmul: dense A @ dense B -> only the kept tiles of C (zeros elsewhere);
- attention_forward, attention_backward: flash attention under a tile dropout mask (skips the
  P·V-side GEMMs of dropped tiles, or whole tiles under drop-keys); the backward's dK/dV and dQ
  kernels live in attention_grad_kv and attention_grad_q, attention_tiling and attention_launch
  hold their device and host helpers.
masked_matmul holds the launch path the two GEMMs share, tiling the device helpers, runtime
autotuning, the interpreter's limits and the TMA checks.
Nothing here imports slicecompile.
"""

from . import attention_backward as _attention_backward
from . import attention_forward as _attention_forward
from . import sparse_input_matmul as _dsd
from . import sparse_output_matmul as _sdd
from .attention_backward import attention_backward
from .attention_forward import attention_forward
from .runtime import interpreting
from .sparse_input_matmul import sparse_input_matmul
from .sparse_output_matmul import sparse_output_matmul


def kernel_names():
    """The names the GPU gives the kernels launched from here (a profiler's event names)."""
    kernels = (
        _dsd.sparse_input_matmul_kernel,
        _sdd.sparse_output_matmul_kernel,
        _attention_forward.attention_forward_kernel,
        _attention_backward.attention_delta_kernel,
        _attention_backward.attention_grad_kv_kernel,
        _attention_backward.attention_grad_q_kernel,
    )
    return tuple(kernel.fn.__name__ for kernel in kernels)


def autotuners():
    """The autotuned kernels by name (none under the interpreter); each one's .cache maps a
    tuning key to the config it chose."""
    tuners = {
        "sparse_input_matmul": _dsd.MATMUL.tuned[False],
        "sparse_input_matmul (tma)": _dsd.MATMUL.tuned[True],
        "sparse_output_matmul": _sdd.MATMUL.tuned[False],
        "sparse_output_matmul (tma)": _sdd.MATMUL.tuned[True],
        "attention_forward": _attention_forward.FORWARD.tuned,
        "attention_backward (dk, dv)": _attention_backward.GRAD_KV.tuned,
        "attention_backward (dq)": _attention_backward.GRAD_Q.tuned,
    }
    return {name: tuner for name, tuner in tuners.items() if tuner is not None}


__all__ = [
    "attention_backward",
    "attention_forward",
    "autotuners",
    "kernel_names",
    "interpreting",
    "sparse_input_matmul",
    "sparse_output_matmul",
]
