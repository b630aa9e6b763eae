"""torch.compile's own features with backend="slicecompile": modes, fullgraph, stances, and
the on-disk compile cache, which a second process reuses and an edit to our sources invalidates."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from slicecompile import kernels
from slicecompile.compiler.backend import slicecompile_backend
from slicecompile.compiler.cache_key import sources_digest

OPTIONS = {"block": (16, 16), "min_gemm_size": 0}


class MLP(nn.Module):
    def __init__(self, width=32, hidden=64, out=16):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(width, hidden), nn.Dropout(0.5), nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(self.drop(self.fc1(x).relu()))


def _step(compiled, model, x):
    out = compiled(x)
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in model.parameters())
    return out


def test_max_autotune_mode():
    """mode= cannot come with options= (torch.compile refuses both), so the sites must pass the
    default size threshold: dropout -> fc2 is 1024 x 256 x 64 = 2**24."""
    torch.manual_seed(0)
    model = MLP(64, 256, 64)
    compiled = torch.compile(model, backend="slicecompile", mode="max-autotune", fullgraph=True)
    with torch._inductor.config.patch(max_autotune_gemm_backends="ATEN"):  # keeps CPU tuning short
        _step(compiled, model, torch.randn(1024, 64))
    assert counters["slicecompile"]["rewritten_dropout_linear"] == 1
    assert "fallback" not in counters["slicecompile"]


class Checkpointed(MLP):
    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False)


@pytest.mark.parametrize("policy", ["block", "slice"])
def test_fullgraph_under_checkpoint_and_autocast(policy):
    """fullgraph=True raises on any graph break: the rewritten site makes none, inside a
    checkpointed region and under autocast."""
    torch.manual_seed(0)
    model = Checkpointed()
    options = {**OPTIONS, "policy": policy}
    compiled = torch.compile(model, backend=slicecompile_backend, options=options, fullgraph=True)
    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16):
        _step(compiled, model, torch.randn(40, 32))
    assert counters["slicecompile"]["rewritten"] == 1 and counters["slicecompile"]["graphs"] == 1


def test_set_stance():
    """force_eager runs the model uncompiled (element-wise dropout); fail_on_recompile raises
    instead of recompiling; back at the default stance, a new shape compiles again."""
    torch.manual_seed(0)
    model = MLP()
    compiled = torch.compile(model, backend=slicecompile_backend, options=OPTIONS, dynamic=False)
    with torch.compiler.set_stance("force_eager"):
        _step(compiled, model, torch.randn(40, 32))
    assert counters["slicecompile"]["graphs"] == 0
    _step(compiled, model, torch.randn(40, 32))
    assert counters["slicecompile"]["graphs"] == 1
    with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(Exception, match="recompil"):
        compiled(torch.randn(48, 32))
    _step(compiled, model, torch.randn(48, 32))
    assert counters["slicecompile"]["graphs"] == 2 and counters["slicecompile"]["rewritten"] == 2


def test_sources_digest_sees_every_source_file(tmp_path):
    package = tmp_path / "kernels"
    shutil.copytree(Path(kernels.__file__).parent, package)
    before = sources_digest([package])
    with open(package / "tile_copy.py", "a") as f:
        f.write("# edited\n")
    assert sources_digest([package]) != before


CACHED_STEP = """
import json, sys
import torch
from torch._dynamo.utils import counters
import slicecompile.compiler.cache_key
if len(sys.argv) > 1:  # stands for an edit of the sources: test_sources_digest_sees_every_source_file
    slicecompile.compiler.cache_key.sources_key = lambda: sys.argv[1]

torch.manual_seed(0)
fc, x = torch.nn.Linear(32, 16), torch.randn(40, 32, requires_grad=True)
step = torch.compile(lambda x: fc(torch.nn.functional.dropout(x, 0.5)), backend="slicecompile",
                     options={"block": (16, 16), "min_gemm_size": 0})
step(x).sum().backward()
print(json.dumps({**counters["inductor"], **counters["slicecompile"]}))
"""


def test_compile_cache_is_reused_and_invalidated_by_an_edit(tmp_path):
    """Three processes share one cache directory: the second reuses the first's compiled
    forward and backward; the third, whose sources_key() differs as after an edit, compiles
    both again."""
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}

    def run(*args):
        command = [sys.executable, "-c", CACHED_STEP, *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second, edited = run(), run(), run("edited")
    assert first["rewritten"] == second["rewritten"] == edited["rewritten"] == 1
    assert (first.get("fxgraph_cache_miss"), first.get("fxgraph_cache_hit")) == (2, None)
    assert (second.get("fxgraph_cache_miss"), second.get("fxgraph_cache_hit")) == (None, 2)
    assert (edited.get("fxgraph_cache_miss"), edited.get("fxgraph_cache_hit")) == (2, None)
