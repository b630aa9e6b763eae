"""The benchmarks' harness (slicecompile/tools/bench.py): CSV files that refuse another header, the
metadata every row carries, rounds that interleave providers; and every bench script's columns
still matching the CSVs it appends to under bench/results."""

import csv
import datetime
import importlib
import pathlib
import statistics

import pytest
import torch
import triton

from slicecompile.tools.bench import (
    CsvFile,
    CsvHeaderError,
    Spread,
    argument_parser,
    header,
    interleave,
    interleaved_steps,
    run_metadata,
    training_step,
)

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"
FIELDS = ["gpu", "size", "ms", "timestamp"]


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_a_new_file_gets_the_header_once_and_each_row_its_metadata(tmp_path):
    path = tmp_path / "deeper" / "times.csv"
    out = CsvFile(path, FIELDS, dict(gpu="H100", timestamp="t0", triton="not a column"))
    out.append(dict(size=1, ms="0.5"))
    out.append(dict(size=2, ms="0.7"), dict(size=3))
    assert rows_of(path) == [FIELDS, ["H100", "1", "0.5", "t0"], ["H100", "2", "0.7", "t0"], ["H100", "3", "", "t0"]]
    CsvFile(path, FIELDS, dict(gpu="H200", timestamp="t1")).append(dict(size=4, ms="0.2"))
    assert rows_of(path)[1:] == [["H100", "1", "0.5", "t0"], ["H100", "2", "0.7", "t0"], ["H100", "3", "", "t0"]] + [
        ["H200", "4", "0.2", "t1"]
    ]


def test_an_empty_file_gets_the_header(tmp_path):
    path = tmp_path / "times.csv"
    path.touch()
    CsvFile(path, FIELDS).append(dict(size=1))
    assert rows_of(path) == [FIELDS, ["", "1", "", ""]]


def test_a_file_with_another_header_is_refused_before_anything_runs_and_left_as_it_is(tmp_path):
    path = tmp_path / "times.csv"
    path.write_text("gpu,size,ms,flops\nH100,1,0.5,3\n")
    with pytest.raises(
        CsvHeaderError, match=r"times\.csv has another header .*lacks timestamp; only the file has flops"
    ):
        CsvFile(path, FIELDS)
    with pytest.raises(CsvHeaderError, match="the same columns in another order"):
        CsvFile(path, ["size", "gpu", "ms", "flops"])
    assert path.read_text() == "gpu,size,ms,flops\nH100,1,0.5,3\n"


def test_a_row_with_a_column_the_file_lacks_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="flops"):
        CsvFile(tmp_path / "times.csv", FIELDS).append(dict(size=1, flops=2))


def test_run_metadata_names_the_device_the_versions_and_the_time_in_utc(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    meta = run_metadata("cpu")
    after = datetime.datetime.now(datetime.timezone.utc)
    assert set(meta) == {"gpu", "torch", "triton", "timestamp"}
    assert meta["gpu"].startswith("cpu ") and f"({torch.get_num_threads()} threads)" in meta["gpu"]
    assert (meta["torch"], meta["triton"]) == (torch.__version__, triton.__version__)
    stamp = datetime.datetime.fromisoformat(meta["timestamp"])
    assert stamp.utcoffset() == datetime.timedelta(0) and before <= stamp <= after
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton interpreter" in run_metadata("cpu")["gpu"]


def test_each_round_runs_every_provider_once_in_order_and_done_follows_each_last_round():
    calls = []

    def provider(name):
        def run():
            calls.append(name)
            return len(calls)

        return run

    done = lambda name, results: calls.append(f"done {name} {results}")
    results = interleave({name: provider(name) for name in "abc"}, rounds=3, done=done)
    assert calls == [*"abcabc", "a", "done a [1, 4, 7]", "b", "done b [2, 5, 9]", "c", "done c [3, 6, 11]"]
    assert results == {"a": [1, 4, 7], "b": [2, 5, 9], "c": [3, 6, 11]}


def test_spread_is_the_median_and_half_the_range():
    spread = Spread.of([3.0, 1.0, 2.0, 2.5])
    assert (spread.median, spread.low, spread.high, spread.half_range) == (2.25, 1.0, 3.0, 1.0 / 2.25)
    assert str(spread) == "2.250 ±44.4%"


def test_training_steps_warm_up_all_before_the_rounds_take_turns():
    calls = []

    def trainer(name):
        def step(x, y):
            calls.append(name)
            return x.sum() + y

        return step

    batches = [(torch.ones(2), 0.0), (torch.zeros(2), 1.0)]
    runs = interleaved_steps({"a": trainer("a"), "b": trainer("b")}, batches, warmup=2, timed=3, rounds=2, device="cpu")
    assert calls == [*"aabb", *"aaabbb", *"aaabbb"]
    for run in runs.values():
        assert [len(times) for times in run.rounds] == [3, 3] and run.kernel_ms is None
        assert run.losses == [2.0, 1.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0]  # warm-up, then each round from batch 0
        assert run.step_ms == statistics.median(t for times in run.rounds for t in times)  # every step, pooled


def test_the_shared_flags():
    cli = argument_parser("doc", rounds=1, device="cpu")
    args = cli.parse_args([])
    assert (args.rounds, args.device) == (1, torch.device("cpu"))
    assert cli.parse_args(["--rounds", "4", "--device", "cuda"]).device == torch.device("cuda")
    with pytest.raises(SystemExit):
        cli.parse_args(["--rounds", "0"])
    assert not hasattr(argument_parser("doc").parse_args([]), "rounds")


# (script, its FIELDS' name, a CSV under bench/results it appends to)
APPENDERS = [
    ("bench_encoder", "FIELDS", "encoder.csv"),
    ("bench_wrn_block", "FIELDS", "wrn_block.csv"),
    ("bench_gpt2_block", "FIELDS", "gpt2_block.csv"),
    ("bench_memory", "FIELDS", "encoder_memory.csv"),
    ("bench_distributed", "FIELDS", "distributed_encoder.csv"),
    ("bench_frontier", "FIELDS", "frontier.csv"),
    ("bench_frontier", "CURVE_FIELDS", "frontier_curves.csv"),
    ("bench_verdicts", "FIELDS", "verdicts.csv"),
    ("bench_hashed_outputs", "FIELDS", "hashed_outputs.csv"),
    ("sweep_kernel_configs", "FIELDS", "kernel_configs.csv"),
    *(("bench_dropout_linear", "FIELDS", f"{name}.csv") for name in ("dropout_linear", "linear_dropout")),
    *(("bench_dropout_linear", "FIELDS", f"{name}.csv") for name in ("dropout_linear_slice", "linear_dropout_blocks")),
]


@pytest.mark.parametrize(("script", "fields", "results"), APPENDERS)
def test_every_bench_script_still_appends_to_its_results(script, fields, results, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module(script)
    path = BENCH / "results" / results
    assert header(path) == getattr(module, fields)
    CsvFile(path, getattr(module, fields))  # no CsvHeaderError


def test_a_training_step_updates_the_weights_and_clears_the_gradients():
    model = torch.nn.Linear(4, 1)
    before = model.weight.detach().clone()
    step = training_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss, "cpu")
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    loss = step(x, y)
    assert loss.dtype == torch.float32 and loss.item() > 0
    assert not torch.equal(model.weight, before) and model.weight.grad is None
