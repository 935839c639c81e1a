"""Scaling of `cfgengine sample` under torchrun: the same command at 1 and at N processes on this
machine, interleaved rounds, median of each; the figure is throughput(N) / throughput(1), both
measured in this run. Writes bench/results/scaling-DEVICE-DATE.json.

    python -m cfgengine.bench.studies.scaling --nproc 2 --rounds 3

Throughput is the sampling time `cfgengine sample` reports (sharded sampling plus the gather on
rank 0); the wall time of the whole launch (torchrun, imports, writing) is recorded beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from cfgengine.atomic import write_atomic

SAMPLE = ["sample", "--ckpt", "default", "--w", "0.3", "--steps", "32", "--per-class", "4"]
REPORTED = re.compile(r"(\d+) samples, \d+ steps, ([\d.]+) s")


def launch(nproc: int, folder: str) -> tuple[float, float]:
    """(sampling seconds reported by rank 0, wall seconds of the launch) of one torchrun run."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.perf_counter()
    out = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={nproc}",
                          "--no-python", "cfgengine", *SAMPLE, "--out", f"{folder}/s.png"],
                         env=env, capture_output=True, text=True, timeout=600, check=True).stdout
    wall = time.perf_counter() - start
    return float(REPORTED.search(out).group(2)), wall


def measure(nproc: int, rounds: int) -> dict:
    """Interleaved rounds of 1 and `nproc` processes; medians and the ratio."""
    times: dict[int, list[tuple[float, float]]] = {1: [], nproc: []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(rounds):
            for n in (1, nproc):
                times[n].append(launch(n, folder))
    median = {n: (statistics.median(t for t, _ in runs), statistics.median(w for _, w in runs))
              for n, runs in times.items()}
    return {"command": "torchrun --standalone --nproc_per_node=N --no-python cfgengine "
                       + " ".join(SAMPLE), "rounds": rounds, "cores": os.cpu_count(),
            "load_average_end": os.getloadavg(), "torch": torch.__version__,
            "sample_seconds": {n: m[0] for n, m in median.items()},
            "wall_seconds": {n: m[1] for n, m in median.items()},
            "speedup_sampling": median[1][0] / median[nproc][0],
            "speedup_wall": median[1][1] / median[nproc][1], "runs": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", default="bench/results")
    args = parser.parse_args(argv)
    result = measure(args.nproc, args.rounds)
    path = Path(args.out_dir) / f"scaling-cpu-{date.today().isoformat()}.json"
    write_atomic(lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"), path)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
