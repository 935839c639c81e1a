"""Runs cfgengine-run and cfgengine.sample on the same package and request, each as a fresh
process (load the package, sample, write x.npy), and prints both wall times, their ratio and the
largest difference of the samples (docs/design.md, "The C++ runner").

    python runner/compare.py MODEL.pt2 --labels 0,1,2,3 --steps 64 [--sampler ddim] [--repeat 3]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PYTHON_JOB = """
import sys, numpy as np, torch, cfgengine
model = cfgengine.load(sys.argv[1])
labels = torch.tensor([int(s) for s in sys.argv[2].split(",")])
x = cfgengine.sample(model, labels, w=float(sys.argv[3]), steps=int(sys.argv[4]),
                     sampler=sys.argv[5], seed=int(sys.argv[6]), batch_size=model.meta.max_batch)
np.save(sys.argv[7], x.numpy())
"""


def cpu_seconds() -> float:
    """User + system CPU time of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of `command` (CPU is the steadier figure on a shared
    machine); exits with its stderr when it fails."""
    start, start_cpu = time.perf_counter(), cpu_seconds()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    if done.returncode != 0:
        sys.exit(f"{command[0]} failed: {done.stderr.strip()}")
    return elapsed, cpu


def medians(command: list[str], repeat: int) -> tuple[float, float]:
    runs = [timed(command) for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--labels", default="0,1,2,3")
    p.add_argument("--w", default="0.3")
    p.add_argument("--steps", default="64")
    p.add_argument("--sampler", default="ancestral")
    p.add_argument("--seed", default="0")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--binary", default=str(Path(__file__).resolve().parents[1] / "build" / "cfgengine-run"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cpp_out, py_out = f"{tmp}/cpp.npy", f"{tmp}/py.npy"
        cpp = [args.binary, args.model, "--labels", args.labels, "--w", args.w, "--steps",
               args.steps, "--sampler", args.sampler, "--seed", args.seed, "--out", cpp_out]
        py = [sys.executable, "-c", PYTHON_JOB, args.model, args.labels, args.w, args.steps,
              args.sampler, args.seed, py_out]
        (cpp_s, cpp_cpu), (py_s, py_cpu) = medians(cpp, args.repeat), medians(py, args.repeat)
        diff = float(np.abs(np.load(cpp_out) - np.load(py_out)).max())
    size_mb = Path(args.binary).stat().st_size / 1e6
    print(f"whole process, median of {args.repeat}: cfgengine-run {cpp_s:.2f} s wall / "
          f"{cpp_cpu:.2f} s CPU, python {py_s:.2f} s wall / {py_cpu:.2f} s CPU; python/C++ = "
          f"{py_s / cpp_s:.2f} (wall), {py_cpu / cpp_cpu:.2f} (CPU); max |dx| = {diff:.2e}; "
          f"binary {size_mb:.2f} MB")


if __name__ == "__main__":
    main()
