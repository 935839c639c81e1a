"""pytest-benchmark suite of whole sampling loops: every engine backend, exported format and
baseline of cfgengine.bench.harness on one short loop, one test each.

    pytest tests/bench/test_sample_bench.py --benchmark-json=bench/results/loop.json
    OMP_NUM_THREADS=1 pytest tests/bench/test_sample_bench.py ...   # on a shared CPU machine

(On the loaded 2-core development machine torch's two default threads made the torch loop 150x
slower than one thread — 0.32 against 48 images/s — so set the thread count on shared CPUs.)

CPU: the tiny preset, B = 2, T = 8; CUDA: the default model, B = 8, T = 64. Each round is one whole
loop followed by a device sync; images/s, ms/step and the shape of the run go into extra_info.
"""
from __future__ import annotations

import functools

import pytest
import torch

from cfgengine.bench import harness
from cfgengine.bench.timing import synced
from cfgengine.bench.workload import bench_model, make_workload

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODEL, BATCH, STEPS = {"cuda": ("default", 8, 64), "cpu": ("tiny", 2, 8)}[DEVICE]
RUNNERS = (*harness.ENGINE_BACKENDS, *harness.EXPORTED, *harness.BASELINES)


@pytest.fixture(scope="module")
def work():
    net, _ = bench_model(MODEL, DEVICE)
    return make_workload(net, DEVICE, "fp32", BATCH, w=0.3, seed=0)


@pytest.mark.parametrize("name", RUNNERS)
def test_sample_loop(benchmark, work, name, tmp_path):
    runner = harness.single_runner(name, work, tmp_path)
    if isinstance(runner, str):
        pytest.skip(runner)
    loop = synced(functools.partial(runner.run, STEPS, "ancestral"), DEVICE)
    loop()  # compilation and graph capture stay outside the rounds
    benchmark.group = f"{DEVICE} {MODEL} B={BATCH} T={STEPS}"
    benchmark.extra_info.update(device=DEVICE, model=MODEL, batch=BATCH, steps=STEPS,
                                role=runner.role)
    benchmark.pedantic(loop, warmup_rounds=1, rounds=5, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(images_per_s=BATCH / seconds, ms_per_step=1e3 * seconds / STEPS)
