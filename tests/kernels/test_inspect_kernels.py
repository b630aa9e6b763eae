"""What must hold of the kernels Hopper runs, checked on any machine: bench/inspect_kernels.py
compiles them for sm_90a with Triton's bundled ptxas (no GPU needed). In bfloat16 at head dim
128 and the 8192x4096x4096 GEMM, on the pointer and TMA paths, each launch's first fitted
candidate (what SLICECOMPILE_AUTOTUNE=0 runs) must compile, multiply on wgmma, and keep its
values in registers (the attention candidates are ordered so; before that, the tutorial's first
backward tiles spilled up to 2.6 KB at head dim 128). The other candidates, head dim 64 and warp
specialisation are left to the inspector's full table, to keep this test to a dozen compiles."""

import csv
import os
import pathlib
import subprocess
import sys

import pytest

INSPECTOR = pathlib.Path(__file__).resolve().parents[2] / "bench" / "inspect_kernels.py"
KERNELS = ["attention_forward", "attention_grad_kv", "attention_grad_q", "sparse_input_matmul", "sparse_output_matmul"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """The inspector's rows of launches (not of variants that change none yet), from a process of
    its own: it needs the kernels compiled for a GPU, which this suite's TRITON_INTERPRET=1
    (without a GPU) rules out once they are imported."""
    table = tmp_path_factory.mktemp("inspect_kernels") / "kernels.csv"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    command = [sys.executable, str(INSPECTOR), "--first", "--head-dims", "128", "--variants", "pointer", "tma"]
    command += ["--csv", str(table)]
    subprocess.run(command, env=env, check=True, timeout=300)
    with open(table, newline="") as f:
        return [row for row in csv.DictReader(f) if not row["note"].startswith("changes no launch")]


def compiled(rows, kernel):
    """The kernel's rows that compiled; the test fails on any that did not."""
    mine = [row for row in rows if row["kernel"] == kernel]
    assert mine, f"{kernel} was not launched"
    failed = [row for row in mine if not row["regs"]]
    assert not failed, [f"{row['variant']} {row['config']}: {row['note']}" for row in failed]
    return mine


def test_every_launch_compiles(rows):
    assert {row["kernel"] for row in rows} >= set(KERNELS)
    failed = [f"{row['kernel']} {row['variant']} {row['config']}: {row['note']}" for row in rows if not row["regs"]]
    assert not failed


@pytest.mark.parametrize("kernel", KERNELS)
def test_multiplies_on_wgmma(rows, kernel):
    assert all(row["wgmma"] == "True" for row in compiled(rows, kernel))


@pytest.mark.parametrize("kernel", KERNELS)
def test_does_not_spill(rows, kernel):
    spills = {f"{row['variant']} {row['config']}": int(row["spill_stores"]) for row in compiled(rows, kernel)}
    assert not any(spills.values()), spills


def test_only_tma_variants_use_the_tensor_memory_accelerator(rows):
    for kernel in KERNELS:
        paths = {(row["variant"], row["config"]): row["tma"] for row in compiled(rows, kernel)}
        assert paths == {path: str(path[0].startswith("tma")) for path in paths}
