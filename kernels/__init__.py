"""Triton kernels and their launchers (installed as `slicecompile.kernels`).

Masked-GEMM primitives, each usable in several roles by permuting operands:
- sparse_input_matmul: block-sparse A @ dense B -> dense C (skips dropped K-tiles);
- sparse_output_matmul: dense A @ dense B -> only the kept tiles of C (zeros elsewhere).
Nothing here imports slicecompile.
"""

from .runtime import interpreting
from .sparse_input_matmul import sparse_input_matmul
from .sparse_output_matmul import sparse_output_matmul

__all__ = ["interpreting", "sparse_input_matmul", "sparse_output_matmul"]
