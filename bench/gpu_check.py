"""The one command to run when a GPU is lent: install, GPU tests, step bandwidth, η(T) and a short
end-to-end sweep, each stage under its own time limit, results under bench/results/.

    python3 bench/gpu_check.py                      # on the GPU machine, from the repo root
    python3 bench/gpu_check.py --dry-run --out-dir /tmp/x   # here: the plan and the writer only

Sized to finish in about 8 minutes on an H100/H200 (the lease includes the machine's start):
stage limits add up to `--budget-s` (default 480 s). Nothing is fetched: the package installs
from this checkout with `pip --no-index --no-deps`; wheels carried in `.whl/` (e.g. diffusers for
baselines 2 and 3, absent from the device image) are installed first when present. Files written
(at most 8): gpu-tests-*.json, step-cuda-*.json, e2e-gpu-eta-*.{json,md,png},
e2e-gpu-short-*.{json,md,png} — each names the device, versions and date.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ("tests/kernels", "tests/test_runtime.py", "tests/export", "tests/test_sampler_api.py",
             "tests/test_rng.py")
MAX_FILES = 8


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the check: a command, its share of the budget, the files it writes."""

    name: str
    command: list[str]
    share: float  # of the budget
    outputs: tuple[str, ...] = ()


def stages(out_dir: Path, date: str) -> list[Stage]:
    """The check's plan, in order."""
    py = sys.executable
    return [
        Stage("install", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                          "--no-build-isolation", "-e", str(ROOT)], 0.06),
        Stage("tests", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        f"--junitxml={out_dir / f'.gpu-tests-{date}.xml'}", *GPU_TESTS], 0.26,
              (f"gpu-tests-{date}.json",)),
        # every rule, one size well past L2, fp32 and bf16, in-kernel noise: one compile per case
        Stage("step", [py, "-m", "cfgengine.bench.step", "--device", "cuda", "--sizes", "64",
                       "--dtypes", "float32", "bfloat16", "--noise", "in-kernel", "--out",
                       str(out_dir / f"step-cuda-{date}.json")], 0.26, (f"step-cuda-{date}.json",)),
        Stage("eta", [py, "-m", "cfgengine.cli", "bench", "--sweep", "gpu-eta", "--out-dir",
                      str(out_dir), "--name", f"e2e-gpu-eta-{date}"], 0.14,
              tuple(f"e2e-gpu-eta-{date}.{k}" for k in ("json", "md", "png"))),
        Stage("e2e", [py, "-m", "cfgengine.cli", "bench", "--sweep", "gpu-short", "--out-dir",
                      str(out_dir), "--name", f"e2e-gpu-short-{date}"], 0.28,
              tuple(f"e2e-gpu-short-{date}.{k}" for k in ("json", "md", "png"))),
    ]


def environment() -> dict:
    """Device, versions and date, read without importing cfgengine (it may not be installed)."""
    probe = ("import json, torch; d = torch.cuda.is_available(); print(json.dumps(dict("
             "device=torch.cuda.get_device_name() if d else 'no CUDA device', "
             "torch=torch.__version__, cuda=torch.version.cuda)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    found = json.loads(done.stdout) if done.returncode == 0 else {"device": "torch missing"}
    return dict(found, python=platform.python_version(), host=platform.node(),
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def junit_summary(xml: Path) -> dict:
    """Counts and failing test ids of a pytest junit file."""
    import xml.etree.ElementTree as ElementTree

    if not xml.is_file():
        return {"error": "pytest wrote no report"}
    suite = ElementTree.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | \
        {"failed": failed}


def write_json(path: Path, payload: dict) -> Path:
    """Write atomically (a killed stage never leaves half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def install_wheels(wheels: Path) -> list[str]:
    """pip-install carried wheels into /tmp/site and put it on the path; their names."""
    found = sorted(str(p) for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    if found:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--target", "/tmp/site", *found], check=True)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, ["/tmp/site",
                                                                 os.environ.get("PYTHONPATH")]))
    return [Path(p).name for p in found]


def run_stage(stage: Stage, limit: float, out_dir: Path, date: str, env: dict) -> dict:
    """Run one stage under `limit` seconds; its record (and the tests' summary file)."""
    start = time.monotonic()
    try:
        done = subprocess.run(stage.command, cwd=ROOT, capture_output=True, text=True,
                              timeout=limit)
        status, tail = ("ok" if done.returncode == 0 else f"exit {done.returncode}",
                        (done.stdout + done.stderr)[-3000:])
    except subprocess.TimeoutExpired as err:
        status, tail = "timed out", str(err.stdout or "")[-3000:]
    record = dict(stage=stage.name, status=status, seconds=round(time.monotonic() - start, 1),
                  limit_s=round(limit), output_tail=tail)
    if stage.name == "tests":
        summary = junit_summary(out_dir / f".gpu-tests-{date}.xml")
        write_json(out_dir / f"gpu-tests-{date}.json", dict(env, **record, **summary))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for all stages together (default: 480)")
    parser.add_argument("--only", default=None, help="comma list of stages to run")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="carried wheels to install")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and write the environment record; run nothing")
    args = parser.parse_args(argv)
    plan = stages(Path(args.out_dir), datetime.date.today().isoformat())
    names = [s.name for s in plan]
    only = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown or not only or not args.budget_s > 0:
        parser.error(f"--only takes stages of {', '.join(names)}; --budget-s must be > 0")
    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        parser.error(f"--out-dir {out_dir} is not a folder")
    return check([s for s in plan if s.name in only], out_dir, args.budget_s, Path(args.wheels),
                 args.dry_run)


def check(plan: list[Stage], out_dir: Path, budget: float, wheels: Path, dry_run: bool) -> int:
    """Run (or, dry, describe) the plan; write gpu-check records; exit 1 if any stage failed."""
    date = datetime.date.today().isoformat()
    env = environment()
    outputs = [o for s in plan for o in s.outputs]
    assert len(outputs) <= MAX_FILES, outputs
    total = sum(s.share for s in plan)
    records = []
    if not dry_run:
        env["wheels"] = install_wheels(wheels)
    for stage in plan:
        limit = budget * stage.share / total
        print(f"[gpu_check] {stage.name}: {' '.join(stage.command)} (limit {limit:.0f} s)")
        if dry_run:
            records.append(dict(stage=stage.name, status="planned", limit_s=round(limit)))
            continue
        records.append(run_stage(stage, limit, out_dir, date, env))
        print(f"[gpu_check] {stage.name}: {records[-1]['status']} in {records[-1]['seconds']} s")
    if dry_run:
        write_json(out_dir / f"gpu-check-plan-{date}.json", dict(env, stages=records,
                                                                  outputs=outputs))
    failed = [r["stage"] for r in records if r["status"] not in ("ok", "planned")]
    print(f"[gpu_check] done; failed stages: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
