"""The demo's model and command: a model whose dropouts the backend rewrites, and tiny end-to-end
runs (bytes on the whole standard library, and BPE with hashed outputs) that write their table,
CSV and plot."""

import csv
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from slicecompile import explain
from slicecompile.demo import train as demo
from slicecompile.demo.model import Config, LanguageModel

from conftest import DEVICE


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


def test_hashed_configurations_mirror_slicecompiles_and_set_the_option():
    args = demo.parser().parse_args(["--backend", "inductor", "--policy", "block", "slice", "--p", "0", "0.2"])
    args.hashed = [0.1, 0.05]
    runs = demo.runs_asked(args)
    assert [run.name for run in runs[2:]] == [
        "slicecompile p=0 hashed@0.1",
        "slicecompile block p=0.2 hashed@0.1",
        "slicecompile slice p=0.2 hashed@0.1",
        "slicecompile p=0 hashed@0.05",
        "slicecompile block p=0.2 hashed@0.05",
        "slicecompile slice p=0.2 hashed@0.05",
    ]
    assert runs[3].options == {"min_gemm_size": 0, "policy": "block", "hashed_outputs": 0.1}
    assert runs[0].options is None and runs[0].objective == "full"


def test_model_loss_is_rewritten_to_hashed_outputs():
    model = LanguageModel(Config(vocab=1024, context=16, layers=1, heads=2, width=32, p=0))
    x = torch.randint(1024, (2, 16))
    report = explain(model, x, x, options={"min_gemm_size": 0, "hashed_outputs": 0.1})
    assert [(site.pattern, site.rewritten) for site in report.sites if site.side == "loss"] == [
        ("hashed_outputs", True)
    ]


def test_demo_runs_and_writes_its_results(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # the byte-level demo must not need it
    argv = ["--device", DEVICE, "--backend", "eager", "slicecompile", "--steps", "4", "--eval-every", "2"]
    argv += ["--corpus", "stdlib", "--layers", "1", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4"]
    assert demo.main(argv + ["--eval-batches", "2", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "demo.csv")))
    assert {(row["backend"], row["policy"]) for row in rows} == {("eager", "-"), ("slicecompile", "block")}
    assert [int(row["step"]) for row in rows] == [2, 4, 2, 4]
    assert all(torch.isfinite(torch.tensor(float(row["val_loss"]))) for row in rows)
    assert {(row["vocab"], row["corpus"]) for row in rows} == {("bytes", "stdlib")}
    assert (tmp_path / "val_loss.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "slicecompile block p=0.1" in out and "of corpus stdlib (" in out


TINY = ["--steps", "4", "--eval-every", "2", "--layers", "1", "--width", "32", "--heads", "2", "--context", "16"]
TINY += ["--batch", "4", "--eval-batches", "2", "--device", DEVICE]


def test_hashed_demo_on_a_bpe_vocabulary(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLICECOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--vocab", "bpe", "--vocab-size", "512", "--backend", "eager", "--p", "0", "--hashed", "0.25"]
    runs = demo.compare(demo.parser().parse_args(argv + TINY + ["--out", str(tmp_path)]))
    assert counters["slicecompile"]["rewritten_hashed_outputs"] >= 1  # the compiled step's loss was hashed
    rows = list(csv.DictReader(open(tmp_path / "demo.csv")))
    assert [(row["objective"], row["step"]) for row in rows] == [("full", "2"), ("full", "4")] + [
        ("hashed@0.25", "2"),
        ("hashed@0.25", "4"),
    ]
    assert {(row["vocab"], row["corpus"]) for row in rows} == {("bpe-512", "modules")}
    assert all(torch.isfinite(torch.tensor(float(row["val_loss"]))) for row in rows)
    # Full-softmax validation over 512 tokens: near log(512) = 6.24 after four steps, where the
    # hashed training loss (a softmax over about a quarter of them) is smaller.
    assert all(5.5 < loss < 7 for run in runs for _, _, loss in run.curve)
    assert "slicecompile p=0 hashed@0.25" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--hashed", "0"], "--hashed takes active shares in"),
        (["--hashed", "0.1", "1.5"], "--hashed takes active shares in"),
        (["--vocab-size", "1000"], "add --vocab bpe"),
        (["--vocab", "bpe", "--vocab-size", "200"], "must exceed the 256 byte values"),
        (["--hashed", "0.6"], "too few output tiles"),  # 2 tiles of 128 bytes: both would be active
    ],
)
def test_bad_vocab_and_hashed_flags_are_refused(flags, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        demo.main(flags + TINY + ["--backend", "eager", "--out", str(tmp_path)])


def test_unknown_corpus_is_refused(capsys):
    with pytest.raises(SystemExit):
        demo.parser().parse_args(["--corpus", "everything"])
    assert "invalid choice: 'everything'" in capsys.readouterr().err
