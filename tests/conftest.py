import os
import pathlib
import sys

import torch

# `python -m pytest` puts the working directory first on sys.path. In the repository's root that
# makes its kernels/ folder (installed as slicecompile.kernels) the top-level `kernels` module,
# in place of the Hugging Face `kernels` package that transformers (>= 5) imports.
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:] = [path for path in sys.path if pathlib.Path(path or ".").resolve() != ROOT]

# Without a GPU the Triton kernels run on the CPU through Triton's interpreter. This must be
# set before slicecompile.kernels is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, one candidate config per kernel: the suite checks results, and tuning every shape
# hypothesis draws would take most of its time. test_autotuning tunes for real.
os.environ.setdefault("SLICECOMPILE_AUTOTUNE", "0")

import pytest  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from slicecompile.compiler import verdicts  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=20, print_blob=True)
# On a GPU every new shape compiles kernels: report a failing example as found, unshrunk.
settings.register_profile("gpu", settings.get_profile("ci"), phases=[Phase.explicit, Phase.reuse, Phase.generate])
# `make soak`: 1,000 examples a property (over 10,000 in all, random models included).
settings.register_profile("soak", deadline=None, max_examples=1000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _default_device():
    """Tensors and modules a test makes without naming a device go to the GPU when there is one,
    so the same suite checks the GPU paths."""
    if DEVICE == "cpu":
        yield
        return
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    """A fresh Dynamo, and slicecompile's counters at zero, for each test."""
    torch._dynamo.reset()
    counters["slicecompile"].clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _untimed(monkeypatch):
    """On a GPU, rewrite="auto" times each site and may leave it to Inductor. The suite checks
    what the rewrites compute, so the rewrite is timed only where a test asks (test_verdicts)."""
    monkeypatch.setattr(verdicts, "TIMED_DEVICES", frozenset())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
