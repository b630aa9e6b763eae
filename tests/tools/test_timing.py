"""The benchmarks' timing helpers (slicecompile/tools/timing.py) on a CPU."""

import time

from slicecompile.tools.timing import mean_call_ms, median_ms


def test_mean_call_ms_warms_up_then_averages_the_calls():
    calls = []
    ms = mean_call_ms(lambda: (calls.append(1), time.sleep(0.002)), calls=5, warmup=3, device="cpu")
    assert len(calls) == 8 and 2 <= ms < 50


def test_median_ms_takes_at_least_min_samples():
    calls = []
    ms = median_ms(lambda: (calls.append(1), time.sleep(0.001)), "cpu", rep_ms=0, min_samples=4)
    assert len(calls) == 5 and 1 <= ms < 50  # a warm-up call, then the samples
