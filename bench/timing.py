"""Timing and environment helpers shared by every benchmark in cfgengine.bench (docs/design.md §4).

`time_seconds` is the per-call median of a short callable (triton's do_bench on CUDA, L2 flushed;
wall clock after warm-up on CPU); `time_once` is one synchronised call of a long one (a whole
sampling loop: CUDA events on CUDA); `interleaved` repeats several long callables in rotating order
so that drift of a shared machine falls on all of them alike; `environment` says where and with
what the figures were taken.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

CPU_MIN_REPS, CPU_MIN_SECONDS = 7, 0.3  # small calls repeat until 0.3 s, so the median is stable


def time_seconds(fn: Callable, device: str) -> float:
    """Median seconds per call: do_bench on CUDA (L2 flushed), wall clock after warm-up on CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(2):  # warm-up: compilation, allocator, caches
        fn()
    times = []
    while len(times) < CPU_MIN_REPS or (sum(times) < CPU_MIN_SECONDS and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_once(fn: Callable, device: str) -> float:
    """Seconds of one call, the device's queue drained before and after (CUDA events on CUDA)."""
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def synced(fn: Callable, device: str) -> Callable:
    """fn followed by a device sync (fn itself on CPU), so a timer sees the work, not its launch."""
    if device != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


def interleaved(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each timer's `repeats` measurements, taken round-robin with the order rotated every round:
    a slow stretch of a shared machine then hits every entry, not the one that happened to run."""
    names = list(timers)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(timers[name]())
    return seconds


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: str, timer: str) -> dict:
    """Where and with what the figures were taken: device, versions, commit, date, load."""
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return dict(device=device, device_name=name, cpu_count=os.cpu_count(),
                cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                triton=_version("triton"), diffusers=_version("diffusers"),
                onnxruntime=_version("onnxruntime"), openvino=_version("openvino"),
                python=platform.python_version(), git_commit=_git_commit(),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                load_average=load_average(), timer=timer)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _git_commit() -> str:
    root = pathlib.Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty",
                               "--abbrev=40"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
