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
CASES = [bench_step.Case(size, dtype, noise, rule) for size in SIZES_MB
         for dtype in bench_step.DTYPES for noise in bench_step.NOISE_MODES
         for rule in bench_step.RULES
         if noise == "in-kernel" or not bench_step.RULES[rule].previous]  # a 2M row draws none


@pytest.mark.parametrize("candidate", bench_step.CANDIDATES)
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"{c.megabytes}MB-{c.dtype}-{c.noise}-{c.rule}")
def test_step(benchmark, case, candidate):
    tensors = bench_step.StepTensors.make(case, DEVICE)
    fn = bench_step.build_candidate(candidate, case, tensors, DEVICE)
    if fn is None:
        pytest.skip("diffusers is not installed (the [bench] extra)")
    benchmark.group = f"{case.megabytes} MB {case.dtype} noise {case.noise} {case.rule}"
    benchmark.extra_info.update(device=DEVICE, bytes_moved=case.bytes_moved, numel=case.numel,
                                batch=bench_step.BATCH)
    benchmark.pedantic(synced(fn, DEVICE), warmup_rounds=3, rounds=20, iterations=1)
    benchmark.extra_info["GBps"] = case.bytes_moved / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("rule", [r for r in bench_step.RULES if not bench_step.RULES[r].previous])
def test_diffusers_baseline_takes_the_same_step(rule):
    """The eager diffusers candidate of every rule is the fused step's math (η = 1 DDIM is the
    ancestral v = 0 step), so the ratios compare equal work. Runs by default (no benchmark)."""
    pytest.importorskip("diffusers.guiders")
    case = bench_step.Case(0.02, "float32", "given", rule)
    assert bench_step.diffusers_parity(case, "cpu") <= 1e-5
