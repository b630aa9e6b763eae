"""Which implementation an op runs on a tensor: the Triton kernels, or the dense reference (the
same definition, element by element)."""

import torch
from torch._subclasses.fake_tensor import is_fake

from ..kernels import interpreting


def use_kernels(t):
    """CUDA tensors, and CPU tensors under Triton's interpreter, run the kernels. Traced CPU
    tensors (torch.compile under the interpreter) take the reference, whose result is the
    same: the interpreter's kernels cannot be traced."""
    return t.is_cuda or (interpreting() and not is_fake(t))


def allow_tf32():
    """float32 GEMMs follow torch.backends.cuda.matmul.allow_tf32, as F.linear does."""
    return torch.backends.cuda.matmul.allow_tf32
