"""The benchmarks' shared harness: what every row carries besides its measurement (the device,
torch's and triton's versions, a UTC timestamp), CSV files that only ever take rows under their
own header, and rounds that interleave providers so that a drift of the machine (clocks,
temperature, another job) touches all of them alike."""

import argparse
import csv
import datetime
import os
import pathlib
import platform
import statistics
from dataclasses import dataclass

import torch
import triton

from .timing import kernel_ms, timed_steps


def argument_parser(doc, *, rounds=None, device=None):
    """An ArgumentParser whose help is the script's docstring, as written. With rounds, a
    --rounds flag (that default) for interleave; with device, a --device flag (a torch.device)."""
    cli = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if rounds is not None:
        what = "rounds, each timing every provider once in turn; the median over rounds is reported"
        cli.add_argument("--rounds", type=_at_least_one, default=rounds, help=what)
    if device is not None:
        cli.add_argument("--device", type=torch.device, default=torch.device(device), help=f"default {device}")
    return cli


def _at_least_one(text):
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return int(text)


def device_name(device="cuda"):
    """The GPU's name; on a CPU 'cpu <machine> (<n> threads)', noting Triton's interpreter when on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    interpreter = ", triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads{interpreter})"


def run_metadata(device="cuda"):
    """What every row of a run carries besides its measurement: gpu, torch, triton, timestamp."""
    return dict(
        gpu=device_name(device),
        torch=torch.__version__,
        triton=triton.__version__,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


class CsvHeaderError(ValueError):
    """A CSV file exists with another header than the rows meant for it."""


class CsvFile:
    """Rows appended to a CSV file under a fixed header: written first when the file is new or
    empty; a file with another header is refused when the CsvFile is made, before anything is
    measured, and left as it is. Each row takes the metadata fields its header names (meta), then
    its own; a row with a field the header lacks is an error, a field it leaves out stays empty.
    Every append flushes, so a run stopped midway keeps what it measured."""

    def __init__(self, path, fields, meta=None):
        self.path, self.fields = pathlib.Path(path), list(fields)
        self.meta = {key: value for key, value in (meta or {}).items() if key in self.fields}
        found = header(self.path)
        if found is not None and found != self.fields:
            raise CsvHeaderError(
                f"{self.path} has another header than these rows ({_difference(found, self.fields)}): its rows "
                "stay as they are; write to another file, or move this one away"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, *rows):
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            if not f.tell():
                writer.writeheader()
            writer.writerows(self.meta | row for row in rows)


def _difference(found, fields):
    """What sets a file's header apart from the rows' fields, in words."""
    lacks, extra = [f for f in fields if f not in found], [f for f in found if f not in fields]
    parts = []
    if lacks:
        parts.append(f"the file lacks {', '.join(lacks)}")
    if extra:
        parts.append(f"only the file has {', '.join(extra)}")
    return "; ".join(parts) or f"the same columns in another order: {','.join(found)}"


def header(path):
    """The first row of a CSV file; None if the file is missing or empty."""
    path = pathlib.Path(path)
    if not path.exists() or not path.stat().st_size:
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


def interleave(providers, rounds, done=None):
    """{name: [each round's result]}: each round calls every provider once, in the order given,
    so that no provider has the machine to itself for all its rounds. done(name, results), if
    given, is called as soon as a provider's last round ends: a run stopped midway (a time limit)
    then keeps what it finished."""
    results = {name: [] for name in providers}
    for round_ in range(rounds):
        for name, provider in providers.items():
            results[name].append(provider())
            if done and round_ == rounds - 1:
                done(name, results[name])
    return results


@dataclass(frozen=True)
class Spread:
    """The median of a measurement over rounds, with its lowest and highest."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values):
        return cls(statistics.median(values), min(values), max(values))

    @property
    def half_range(self):
        """Half the range over rounds, as a share of the median."""
        return (self.high - self.low) / 2 / self.median if self.median else 0.0

    def __str__(self):
        return f"{self.median:.3f} ±{100 * self.half_range:.1f}%"


def training_step(model, optimizer, loss_fn, device_type="cuda"):
    """step(x, y) -> loss: the forward under bf16 autocast, loss_fn(output in fp32, y), the
    backward and the optimizer's step, the gradients then set to None."""

    def step(x, y):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


@dataclass
class StepRuns:
    """One training step's measurements: each round's step ms, every step's loss (warm-up first),
    and the summed GPU kernel time of a step (None on a CPU)."""

    rounds: list
    losses: list
    kernel_ms: float | None = None

    @property
    def step_ms(self):
        """The median over every timed step of every round."""
        return statistics.median(t for round_times in self.rounds for t in round_times)

    @property
    def spread(self):
        """Of the rounds' own medians."""
        return Spread.of([statistics.median(round_times) for round_times in self.rounds])


def interleaved_steps(steps, batches, warmup, timed, rounds, device="cuda"):
    """{name: StepRuns} of training steps (step(x, y) -> loss, one per name): each runs `warmup`
    steps (compilation) before any is timed, then `rounds` rounds run `timed` steps of each in
    turn; last, on a GPU, each step's kernel time (torch.profiler, over 5 steps)."""
    results = {name: StepRuns([], timed_steps(step, batches, warmup, device)[1]) for name, step in steps.items()}
    timers = {name: lambda step=step: timed_steps(step, batches, timed, device) for name, step in steps.items()}
    for name, runs in interleave(timers, rounds).items():
        for times, losses in runs:
            results[name].rounds.append(times)
            results[name].losses += losses
    if torch.device(device).type == "cuda":
        for name, step in steps.items():
            results[name].kernel_ms = kernel_ms(lambda step=step: step(*batches[0]), steps=5)
    return results
