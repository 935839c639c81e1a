"""Smoke test of the end-to-end benchmark at toy size (tiny preset, T ∈ {2, 4}, B = 2, one round),
so the harness cannot rot: the document's schema, figures consistent with each other, the files."""
from __future__ import annotations

import json

import pytest

from cfgengine.bench import harness, report
from cfgengine.bench.workload import bench_model, make_workload
from cfgengine.cli import main

CONFIG = harness.SweepConfig(model="tiny", steps=(2, 4), batches=(2,), backends=("torch",),
                             baselines=("baseline1", "baseline2"), repeats=1, threads=1)


@pytest.fixture(scope="module")
def result():
    pytest.importorskip("diffusers")
    return harness.sweep(CONFIG, progress=False)


def test_document_names_where_and_what(result):
    for key in ("device", "torch", "git_commit", "date", "load_average", "model", "config"):
        assert key in result
    assert tuple(result["config"]["steps"]) == (2, 4)
    runners = {(r["runner"], r["steps"]) for r in result["cells"]}
    assert runners == {(n, t) for n in ("cfgengine/torch", "baseline1", "baseline2")
                       for t in (2, 4)}


def test_figures_agree_with_the_times(result):
    cells = {(r["runner"], r["steps"]): r for r in result["cells"]}
    for r in result["cells"]:
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["seconds"])
        assert r["ms_per_step"] == pytest.approx(1e3 * r["seconds"] / r["steps"])
        assert r["eta"] == pytest.approx(r["steps"] * r["t_forward_2B"] / r["seconds"])
        # T forwards take no longer than a loop of T steps; the slack is one round's noise on a
        # shared machine (this test times each figure once)
        assert 0 < r["eta"] < 3
        for baseline, ratio in r.get("speedup", {}).items():
            assert ratio == pytest.approx(cells[baseline, r["steps"]]["seconds"] / r["seconds"])


def test_fits_and_goals(result):
    assert len(result["fits"]) == 3
    seconds = {(r["runner"], r["steps"]): r["seconds"] for r in result["cells"]}
    for fit in result["fits"]:  # two T values: the line passes through both points
        for steps in (2, 4):
            assert fit["a_seconds"] + fit["b_seconds_per_step"] * steps == pytest.approx(
                seconds[fit["runner"], steps])
    goals = result["goals"]["cfgengine/torch"]
    assert goals["images/s >= 1.1x baseline3"] == dict(target=1.1, worst=None, met=None)
    assert goals["images/s >= 3x baseline1"]["worst"] == pytest.approx(
        min(r["speedup"]["baseline1"] for r in result["cells"] if r["role"] == "engine"))


def test_every_runner_takes_the_same_steps(result):
    """DDIM η = 0 from the same z_0: the baselines' outputs equal the engine's to rounding."""
    for errors in result["parity_ddim"].values():
        assert max(errors.values()) < 1e-5


def test_files_are_consistent(result, tmp_path):
    paths = report.write(result, tmp_path, "run", "cfgengine bench --test")
    assert json.loads(paths["json"].read_text())["cells"] == json.loads(json.dumps(
        result["cells"]))
    table = paths["md"].read_text()
    assert table.count("| cfgengine/torch | fp32 | 2 |") == 3  # two cells and the fit
    assert "run.png" in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_exporter_is_skipped_with_a_reason(tmp_path):
    net, _ = bench_model("tiny", "cpu")
    work = make_workload(net, "cpu", "fp32", 2, w=0.3, seed=0)
    try:
        import cfgengine.export.onnx  # noqa: F401
    except ImportError:
        assert "not available" in harness.exported_backend("onnx", work, tmp_path)
    else:
        pytest.skip("cfgengine.export.onnx exists: the hook exports instead of skipping")


@pytest.mark.parametrize("argv", [["--steps", "1"], ["--backends", "nope"], ["--batch", "x"],
                                  ["--model", "huge"]])
def test_cli_user_errors_are_one_line(argv, capsys):
    assert main(["bench", *argv]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_writes_the_three_files(tmp_path, capsys):
    pytest.importorskip("diffusers")
    argv = ["bench", "--model", "tiny", "--steps", "2,3", "--batch", "2", "--backends", "torch",
            "--baselines", "baseline1", "--repeats", "1", "--out-dir", str(tmp_path),
            "--threads", "1", "--name", "smoke"]
    assert main(argv) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"smoke.json", "smoke.md", "smoke.png"}
    assert "--model tiny" in json.loads((tmp_path / "smoke.json").read_text())["command"]
