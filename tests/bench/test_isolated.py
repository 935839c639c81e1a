"""The isolated harness (issue 27) on a tiny cell: two runners, each in a process of its own, give
the documented record — distinct pids, FLOPs from torch's counter, GFLOP/s, a GEMM roofline."""
from __future__ import annotations

import os

import pytest
import torch

from cfgengine.bench import harness, isolated, report
from cfgengine.bench.workload import bench_model

CONFIG = harness.SweepConfig(model="tiny", steps=(3,), batches=(2,), backends=("torch",),
                             precisions=("fp32",), baselines=("baseline1",), repeats=1,
                             threads=1, processes=1)


@pytest.fixture(scope="module")
def result():
    return isolated.sweep(CONFIG, progress=False)


def test_each_runner_ran_in_its_own_process(result):
    assert not result["skipped"]
    rows = {r["runner"]: r for r in result["cells"]}
    assert set(rows) == {"cfgengine/torch", "baseline1"}
    pids = [tuple(r["pids"]) for r in rows.values()] + [(result["roofline"]["pid"],)]
    flat = [p for ps in pids for p in ps]
    assert len(flat) == len(set(flat)) == 3 and os.getpid() not in flat


def test_record_fields_agree(result):
    net, _ = bench_model("tiny", "cpu")
    doubled = isolated.forward_flops(net, "cpu", 2, CONFIG)
    # FLOPs are linear in the rows: the doubled forward of B = 2 is twice that of B = 1
    assert doubled == 2 * isolated.forward_flops(net, "cpu", 1, CONFIG)
    for r in result["cells"]:
        assert (r["batch"], r["steps"], r["precision"]) == (2, 3, "fp32")
        assert r["flops"] == 3 * doubled
        assert r["gflops_per_s"] == pytest.approx(r["flops"] / r["seconds"] / 1e9)
        assert r["roofline_fraction"] == pytest.approx(
            r["gflops_per_s"] / result["roofline"]["gflops_per_s"]["fp32"])
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["seconds"])
        assert len(r["seconds_all"]) == CONFIG.repeats * CONFIG.processes
    engine = next(r for r in result["cells"] if r["role"] == "engine")
    baseline = next(r for r in result["cells"] if r["role"] == "baseline")
    assert engine["speedup"]["baseline1"] == pytest.approx(baseline["seconds"] / engine["seconds"])
    assert set(result["goals"]) == {"cfgengine/torch fp32"}


def test_roofline_is_a_plausible_gemm_rate(result):
    rates = result["roofline"]["gflops_per_s"]
    assert 0.1 < rates["fp32"] < 1e4 and "bf16" in rates
    assert torch.get_num_threads() >= 1


def test_markdown_shows_flops_and_isolation(result, tmp_path):
    text = report.markdown(dict(result, command="cfgengine bench --processes 1"))
    for words in ("GFLOP/s", "own process", "MatMulInteger", "issue 27"):
        assert words in text


def test_a_failing_runner_is_skipped_with_its_reason():
    config = harness.SweepConfig(model="tiny", steps=(2,), batches=(1,), backends=("torch",),
                                 precisions=("int8",), baselines=(), repeats=1, threads=1,
                                 processes=1)
    got = isolated._spawn(dict(runner="torch", precision="int8"), config)
    assert "int8" in (got.get("skipped") or got.get("error", ""))


def test_precisions_of_one_backend_stay_apart():
    """Two precisions of one backend are two runners: their processes' times are not pooled."""
    specs = [dict(runner="auto", precision="fp32"), dict(runner="auto", precision="int8"),
             dict(runner="baseline2", precision="fp32")]

    def run(pid: int, seconds: float) -> dict:
        return dict(pid=pid, cells=[dict(batch=1, steps=4, seconds_all=[seconds],
                                         t_forward_2B=seconds / 4, t_step=0.0)])
    runs = {("cfgengine/auto", "fp32"): [run(1, 2.0)], ("cfgengine/auto", "int8"): [run(2, 1.0)],
            ("baseline2", "fp32"): [run(3, 4.0)]}
    rows, skipped = isolated._cells(specs, runs, {1: 10}, dict(gflops_per_s=dict(fp32=1.0)))
    got = {(r["runner"], r["precision"]): r for r in rows}
    assert not skipped and len(rows) == 3
    assert got[("cfgengine/auto", "fp32")]["speedup"]["baseline2"] == 2.0
    assert got[("cfgengine/auto", "int8")]["speedup"]["baseline2"] == 4.0
    assert got[("cfgengine/auto", "int8")]["pids"] == [2]
    assert got[("cfgengine/auto", "int8")]["speedup_by_round"] == {"baseline2": [4.0]}
    assert got[("cfgengine/auto", "int8")]["roofline_fraction"] is None  # no int8 GEMM measured
    goals = isolated.precision_goals(rows)
    assert goals["faster of bf16/int8 >= 2.5x baseline2 at B = 1"]["worst"] == 4.0
