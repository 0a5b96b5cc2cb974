"""How a call is timed, and its peak memory.

On a CUDA GPU: triton.testing.do_bench (CUDA events after warm-up, the median; DESIGN.md
section 6). On the CPU: wall-clock medians of repeated calls after one warm-up call (there
are no events to time with, and nothing runs asynchronously). Every timer here runs the call
with our kernels' scratch poisoning off (kernels.runtime.scratch_poisoned): this repository's
conftest turns it on for the tests, and the sweep runs as tests.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys
import time

import torch

PROFILED_CALLS = 5  # calls under torch.profiler for kernel_ms, after one unprofiled call
CPU_BUDGET_S = 1.0  # repeat a CPU call for about this long (at least CPU_MIN_CALLS calls)
CPU_MIN_CALLS = 3


def _unpoisoned(timer):
    """timer run with kernels.runtime.POISON_SCRATCH off, where our kernels are loaded (their
    NaN fills are not the kernel's work: 0.3 ms of chunk_kda's 2.2 at B1 T16384 on an H200)."""

    @functools.wraps(timer)
    def run(*args, **kwargs):
        runtime = sys.modules.get("kdaverify.kernels.runtime")
        with runtime.scratch_poisoned(False) if runtime else contextlib.nullcontext():
            return timer(*args, **kwargs)

    return run


@_unpoisoned
def median_ms(fn, device: str, budget_s: float = CPU_BUDGET_S) -> tuple[float, str]:
    """(median milliseconds of fn(), how it was timed). budget_s: CPU only, see CPU_BUDGET_S."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")), "do_bench median"
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < CPU_MIN_CALLS or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return 1e3 * statistics.median(times), f"perf_counter median of {len(times)}"


@_unpoisoned
def kernel_ms(fn, prefix: str = "") -> dict[str, float]:
    """Milliseconds of GPU time per call of each CUDA kernel fn launches whose name starts with
    prefix, from torch.profiler over PROFILED_CALLS calls (after one unprofiled call). Their
    sum is the time the GPU spent in kernels; a do_bench median well above it is time the GPU
    sat idle between launches, waiting for the host (a launch-bound call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            fn()
        torch.cuda.synchronize()
    return {
        e.key: e.self_device_time_total / PROFILED_CALLS / 1e3
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.key.startswith(prefix)
    }


@_unpoisoned
def peak_mib(fn, device: str) -> float | None:
    """Peak device memory allocated during one call (inputs included), MiB; None on the CPU,
    where torch keeps no allocator statistics."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def synchronized(fn, device: str):
    """fn, followed by a device synchronisation (for timers that read the host clock), with
    the scratch poisoning off (_unpoisoned)."""

    @_unpoisoned
    def call():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return call
