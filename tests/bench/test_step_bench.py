"""pytest-benchmark suite of the guided step: the candidates of cfgengine.bench.step, one test each.

    pytest tests/bench/test_step_bench.py                       # CPU: the torch path, small sizes
    pytest tests/bench/test_step_bench.py --benchmark-json=...  # on a GPU: the kernel, 1–256 MB

Each call is followed by a device sync, so a timing covers the work and not just its launch; bytes
moved and GB/s go into extra_info. Ratios between candidates are read off one run's table.
"""
from __future__ import annotations

import pytest
import torch

from cfgengine.bench import step as bench_step
from cfgengine.bench.timing import synced

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES_MB = {"cuda": (1, 64, 256), "cpu": (1,)}[DEVICE]
CASES = [bench_step.Case(size, dtype, noise) for size in SIZES_MB
         for dtype in bench_step.DTYPES for noise in bench_step.NOISE_MODES]


@pytest.mark.parametrize("candidate", bench_step.CANDIDATES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.megabytes}MB-{c.dtype}-{c.noise}")
def test_step(benchmark, case, candidate):
    tensors = bench_step.StepTensors.make(case, DEVICE)
    fn = bench_step.build_candidate(candidate, case, tensors, DEVICE)
    if fn is None:
        pytest.skip("diffusers is not installed (the [bench] extra)")
    benchmark.group = f"{case.megabytes} MB {case.dtype} noise {case.noise}"
    benchmark.extra_info.update(device=DEVICE, bytes_moved=case.bytes_moved, numel=case.numel,
                                batch=bench_step.BATCH)
    benchmark.pedantic(synced(fn, DEVICE), warmup_rounds=3, rounds=20, iterations=1)
    benchmark.extra_info["GBps"] = case.bytes_moved / benchmark.stats.stats.median / 1e9
