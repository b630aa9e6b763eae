"""The demo's data, model and command: real text split per file, a model whose dropouts the
backend rewrites, and a tiny end-to-end run that writes its table, CSV and plot."""

import csv
import os
import sysconfig

import torch

from slicecompile import explain
from slicecompile.demo import textdata
from slicecompile.demo import train as demo
from slicecompile.demo.model import Config, LanguageModel

from conftest import DEVICE


def test_text_is_split_per_file_and_batches_shift_by_one():
    train, validation = textdata.load()
    assert train.dtype == torch.uint8 and 0.85 < len(train) / (len(train) + len(validation)) < 0.95
    with open(os.path.join(sysconfig.get_paths()["stdlib"], textdata.FILES[0]), "rb") as f:
        first = f.read()
    cut = int(len(first) * textdata.TRAIN_SHARE)
    assert bytes(train[:cut].tolist()) == first[:cut] and bytes(validation[: len(first) - cut].tolist()) == first[cut:]
    x, y = textdata.batch(train, 3, 10, torch.Generator().manual_seed(0), DEVICE)
    assert x.shape == y.shape == (3, 10) and torch.equal(x[:, 1:], y[:, :-1])


def test_model_dropouts_are_rewritten():
    model = LanguageModel(Config(context=16, layers=2, heads=2, width=32, p=0.1))
    x = torch.randint(256, (2, 16))
    report = explain(model, x, x, options={"min_gemm_size": 0})
    assert [(site.pattern, site.rewritten) for site in report.sites] == [
        ("attention_dropout", True),
        ("dropout_linear", True),
    ] * 2


def test_configurations_asked():
    args = demo.parser().parse_args(
        ["--backend", "eager", "slicecompile", "--policy", "block", "slice", "--p", "0", "0.2"]
    )
    assert [run.name for run in demo.runs_asked(args)] == [
        "eager p=0",
        "eager p=0.2",
        "slicecompile p=0",
        "slicecompile block p=0.2",
        "slicecompile slice p=0.2",
    ]


def test_demo_runs_and_writes_its_results(tmp_path, capsys):
    argv = ["--device", DEVICE, "--backend", "eager", "slicecompile", "--steps", "4", "--eval-every", "2"]
    argv += ["--layers", "1", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4"]
    assert demo.main(argv + ["--eval-batches", "2", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "demo.csv")))
    assert {(row["backend"], row["policy"]) for row in rows} == {("eager", "-"), ("slicecompile", "block")}
    assert [int(row["step"]) for row in rows] == [2, 4, 2, 4]
    assert all(torch.isfinite(torch.tensor(float(row["val_loss"]))) for row in rows)
    assert (tmp_path / "val_loss.png").stat().st_size > 10_000
    assert "slicecompile block p=0.1" in capsys.readouterr().out
