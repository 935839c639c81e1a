"""How many intra-op threads the CPU runtimes (torch, ONNX Runtime) use: one per physical core
this process may actually run on, unless the user says otherwise.

`os.cpu_count()` counts the machine, not the cores a container, `taskset` or a batch scheduler
grants this process (`os.sched_getaffinity`); more threads than granted cores only makes them
preempt each other, and hyper-threads share one core's execution units. Overrides, first set wins:
`CFGENGINE_THREADS` (cfgengine's own), then `OMP_NUM_THREADS` (what torch and OpenMP honour).
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VARS = ("CFGENGINE_THREADS", "OMP_NUM_THREADS")


def available_cpus() -> set[int]:
    """The logical CPUs this process may run on (its affinity mask; all CPUs where the OS has
    no affinity call)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int] | None = None) -> int:
    """Distinct physical cores among `cpus` (default: the available ones), from sysfs topology;
    a CPU without topology information counts as its own core."""
    cores = set()
    for cpu in available_cpus() if cpus is None else cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list")
        cores.add(siblings.read_text().strip() if siblings.exists() else str(cpu))
    return max(1, len(cores))


def env_threads() -> int | None:
    """The thread count set by CFGENGINE_THREADS or OMP_NUM_THREADS, else None; ValueError for a
    value that is not a positive integer (OpenMP's list form "4,2" takes its first entry)."""
    for name in ENV_VARS:
        text = os.environ.get(name, "").strip()
        if not text:
            continue
        first = text.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise ValueError(f"{name}={text!r}: expected a positive number of threads")
        return int(first)
    return None


def intra_op_threads() -> int:
    """Threads for one CPU runtime: the override if set, else one per available physical core."""
    return env_threads() or physical_cores()


def apply_to_torch() -> int:
    """Set torch's intra-op pool to `intra_op_threads()` (the CLI does this; the Python API leaves
    the caller's torch settings alone); returns the count."""
    import torch

    threads = intra_op_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
