"""Which implementation an op runs on a tensor: the Triton kernels, or the dense reference (the
same definition, element by element)."""

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels import interpreting


def use_kernels(t):
    """CUDA tensors, and CPU tensors under Triton's interpreter, run the kernels. Traced CPU
    tensors (torch.compile under the interpreter) take the reference, whose result is the
    same: the interpreter's kernels cannot be traced. So do meta tensors, which have no data
    for a kernel to read."""
    return t.is_cuda or (interpreting() and t.device.type == "cpu" and not is_fake(t))


def any_empty(*tensors):
    """True when one of the tensors has no elements: the op is then the dense op on empty
    operands, and no kernel is launched over a zero-size grid. Decided without adding a guard
    under torch.compile: a symbolic size that is not known to be zero counts as non-zero (Dynamo
    specialises sizes it sees as 0, so a zero batch recompiles and lands here as a constant)."""
    return any(statically_known_true(t.numel() == 0) for t in tensors)


def allow_tf32():
    """float32 GEMMs follow torch.backends.cuda.matmul.allow_tf32, as F.linear does."""
    return torch.backends.cuda.matmul.allow_tf32
