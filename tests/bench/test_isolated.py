"""The isolated harness (issue 27) on a tiny cell: two runners, each in a process of its own, give
the documented record — distinct pids, FLOPs from torch's counter, GFLOP/s, a GEMM roofline."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from cfgengine.bench import harness, isolated, report
from cfgengine.bench.workload import bench_model, make_workload

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


PEER_CONFIG = harness.SweepConfig(model="tiny", steps=(3,), batches=(2,), backends=("torch",),
                                  precisions=("fp32", "fp16"), baselines=(), peers=("openvino",),
                                  repeats=1, threads=1, processes=1)


def test_the_openvino_peer_runs_in_its_own_process_or_is_skipped_with_its_reason():
    """fp32: the peer samples in a process of its own beside the engine (or, without openvino,
    is skipped naming it); fp16 is no precision it runs: skipped with that reason."""
    result = isolated.sweep(PEER_CONFIG, progress=False)
    reasons = {s["runner"]: s["reason"] for s in result["skipped"]}
    assert "fp16" in reasons["openvino fp16"]
    rows = {(r["runner"], r["precision"]): r for r in result["cells"]}
    engine = rows[("cfgengine/torch", "fp32")]
    assert set(result["goals"]) == {"cfgengine/torch fp32", "cfgengine/torch fp16"}  # no peer
    if importlib.util.find_spec("openvino") is None:
        assert "openvino" in reasons["openvino fp32"] and ("openvino", "fp32") not in rows
        return
    peer = rows[("openvino", "fp32")]
    assert peer["role"] == "peer" and "openvino fp32" not in reasons
    assert not set(peer["pids"]) & {*engine["pids"], os.getpid()}
    assert peer["speedup_over_engine"]["cfgengine/torch"] == pytest.approx(
        engine["seconds"] / peer["seconds"])
    assert "(peer)" in report.markdown(dict(result, command="x"))


def test_the_openvino_peer_samples_what_the_engine_samples():
    """Same workload, same step, the network on OpenVINO: DDIM η = 0 from the same z_0 gives the
    engine's fp32 samples to float rounding (the two runtimes' fp32 convolutions differ in
    summation order only: ~1e-6 relative per forward, grown over 4 steps), while another w —
    a real change of the sampled function — moves them by far more. The trained default model:
    a random net's samples clip to ±1 almost everywhere, which would hide any difference."""
    pytest.importorskip("openvino")
    from cfgengine.bench import openvino_peer

    net, source = bench_model("default", "cpu")
    work = make_workload(net, "cpu", "fp32", 2, w=0.3, seed=0)
    peer = openvino_peer.peer_runner("openvino", work)
    assert not isinstance(peer, str), peer
    assert peer.name == "openvino" and peer.role == "peer"

    def engine(w: float) -> torch.Tensor:
        runner = harness.engine_runner("torch", net, make_workload(net, "cpu", "fp32", 2, w=w,
                                                                   seed=0), "eager")
        return runner.run(4, "ddim").double()
    x = engine(0.3)
    rel = lambda y: float((y - x).norm() / x.norm())
    assert rel(peer.run(4, "ddim").double()) < 1e-4
    assert rel(engine(2.0)) > 1e-2, source
