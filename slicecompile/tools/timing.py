"""Timing helpers for the benchmarks: median wall time of a callable (CUDA events
through triton's do_bench on a GPU, perf_counter on a CPU), mean wall time of calls in a row, the
GPU kernel time of a step, and the wall time of each of a run of training steps."""

import statistics
import time

import torch


def median_ms(fn, device, grad_to_none=None, rep_ms=200, min_samples=3):
    """On a CPU: at least min_samples timed calls, and as many as fit in rep_ms."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
    fn()  # warm-up
    samples = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(samples) < min_samples or time.perf_counter() < deadline:
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def mean_call_ms(fn, calls, warmup=10, device="cuda"):
    """Mean wall ms per call over `calls` calls in a row after `warmup`, synchronised only before
    and after them, so that the host runs ahead of the GPU as in training: throughput, not latency."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1000


def kernel_ms(fn, grad_to_none=(), steps=10):
    """Summed GPU time of the kernels one call of fn launches (torch.profiler, CUDA only),
    averaged over steps: the cost of fn once the host's launch overhead is hidden."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            for t in grad_to_none:
                t.grad = None
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / steps / 1000


def timed_steps(step, batches, steps, device="cuda"):
    """Run step(*batches[i % len(batches)]) `steps` times; returns each step's wall ms (CUDA
    events, synchronised after every step, on a GPU; perf_counter on a CPU) and its loss
    (step's return value)."""
    times, losses = [], []
    for i in range(steps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(*batches[i % len(batches)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            loss = step(*batches[i % len(batches)])
            times.append((time.perf_counter() - start) * 1000)
        losses.append(loss.item())
    return times, losses
