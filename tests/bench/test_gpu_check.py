"""bench/gpu_check.py on CPU: its argument handling, its plan and its writers, so that it cannot
fail on a typo when a GPU is finally lent."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cfgengine.bench import gpu_check

SCRIPT = Path(gpu_check.__file__)


def test_dry_run_writes_the_plan_with_device_versions_and_date(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (plan_file,) = tmp_path.glob("gpu-check-plan-*.json")
    plan = json.loads(plan_file.read_text())
    assert {"device", "torch", "python", "date"} <= set(plan)
    assert [s["stage"] for s in plan["stages"]] == ["install", "tests", "step", "eta", "e2e"]
    assert sum(s["limit_s"] for s in plan["stages"]) == pytest.approx(480, abs=3)
    assert len(plan["outputs"]) <= gpu_check.MAX_FILES
    assert "cfgengine.bench.step" in done.stdout and "gpu-short" in done.stdout


@pytest.mark.parametrize("argv", [["--only", "tset"], ["--only", ","], ["--budget-s", "0"],
                                  ["--out-dir", "/no/such/folder"], ["--bogus"]])
def test_bad_arguments_exit_2_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--dry-run", *argv])
    assert info.value.code == 2


def test_every_stage_command_names_real_modules_and_sweeps():
    from cfgengine.bench.harness import SWEEPS

    plan = gpu_check.stages(Path("/tmp"), "2026-01-01")
    for stage in plan:
        if "--sweep" in stage.command:
            assert stage.command[stage.command.index("--sweep") + 1] in SWEEPS
        if "-m" in stage.command:
            module = stage.command[stage.command.index("-m") + 1]
            assert module in ("pip", "pytest") or __import__("importlib").util.find_spec(module)
    for path in gpu_check.GPU_TESTS:
        assert (gpu_check.ROOT / path).exists(), path


def test_a_stage_past_its_limit_is_recorded_as_timed_out(tmp_path):
    stage = gpu_check.Stage("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1.0)
    record = gpu_check.run_stage(stage, 0.5, tmp_path, "d", {})
    assert record["status"] == "timed out" and record["seconds"] < 10


def test_junit_summary_counts_and_names_failures(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="t" name="a"/><testcase classname="t" name="b">'
                   '<failure message="x"/></testcase><testcase classname="t" name="c">'
                   '<skipped/></testcase></testsuite></testsuites>')
    summary = gpu_check.junit_summary(xml)
    assert summary["tests"] == 3 and summary["failures"] == 1 and summary["failed"] == ["t::b"]
    assert "error" in gpu_check.junit_summary(tmp_path / "none.xml")
