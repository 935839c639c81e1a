"""Images/s of the exported backends (ONNX Runtime, AOTInductor) against eager torch on CPU: one
full `cfgengine.sample` (T steps, one batch) per timing, all backends in one process, repetitions
interleaved (the order rotates each round) so drift on a shared machine hits every backend alike;
medians, and ratios against eager measured in the same run.

    python -m cfgengine.bench.backends --out bench/results/backends-cpu-<date>.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import cfgengine
from cfgengine import checkpoint
from cfgengine.export import aoti, metadata
from cfgengine.export import onnx as onnx_export
from cfgengine.export.program import trace
from cfgengine.unet import UNet, preset

SHARED_NOTE = ("2-core machine shared with other engineers' builds and tests: absolute images/s "
               "are noisy; the ratios come from interleaved repetitions in one process")


def bench_model() -> tuple[torch.nn.Module, str]:
    """The embedded `default` model if it is installed, else a `default`-preset UNet at seed 0."""
    if (checkpoint.ASSETS / "default.safetensors").is_file():
        return checkpoint.load("default"), "cfgengine/assets/default.safetensors"
    torch.manual_seed(0)
    net = UNet(preset("default")).eval().requires_grad_(False)
    return net, "UNet(preset('default')), random init, seed 0 (no embedded default model yet)"


def build_backends(model: torch.nn.Module, batch: int, threads: int,
                   workdir: Path) -> dict[str, Callable]:
    """eager (the torch model) and its ONNX Runtime and AOTInductor exports, from one trace."""
    traced = trace(model, max_batch=batch, source="bench")
    onnx_path = onnx_export.export_program(traced, workdir / "model.onnx")
    aoti_path = aoti.export_program(traced, workdir / "model.pt2")
    return {"eager": model, "onnxruntime": onnx_export.load(onnx_path, threads=threads),
            "aoti": aoti.load(aoti_path)}


def time_sample(backend, labels: torch.Tensor, steps: int) -> float:
    """Seconds for one guided sample of len(labels) rows and `steps` steps."""
    start = time.perf_counter()
    cfgengine.sample(backend, labels, w=0.3, steps=steps, seed=0)
    return time.perf_counter() - start


def measure(backends: dict[str, Callable], labels: torch.Tensor, steps: int,
            reps: int) -> dict[str, list[float]]:
    """Interleaved timings: round r runs every backend once, in an order rotated by r."""
    names = list(backends)
    for name in names:
        time_sample(backends[name], labels, 2)  # warm-up: allocator, thread pools, lazy init
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_sample(backends[name], labels, steps))
    return times


def summarise(times: dict[str, list[float]], batch: int) -> dict[str, dict]:
    """Median seconds, images/s and the speed ratio against eager for each backend."""
    eager = statistics.median(times["eager"])
    return {name: {"seconds": ts, "median_s": statistics.median(ts),
                   "images_per_s": batch / statistics.median(ts),
                   "speedup_vs_eager": eager / statistics.median(ts)} for name, ts in times.items()}


def environment(threads: int) -> dict:
    """Device, versions, commit and date for the result file."""
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"device": f"cpu: {cpu}", "threads": threads, "note": SHARED_NOTE,
            "load_average_1m_at_start": os.getloadavg()[0], "git_commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__}}


def run(steps: int, batch: int, reps: int, threads: int) -> dict:
    """The whole benchmark as a JSON-ready dict."""
    torch.set_num_threads(threads)
    model, source = bench_model()
    labels = torch.arange(batch) % model.num_classes
    with tempfile.TemporaryDirectory() as workdir:
        backends = build_backends(model, batch, threads, Path(workdir))
        result = environment(threads)
        times = measure(backends, labels, steps, reps)
    result.update(model=source, parameters=sum(p.numel() for p in model.parameters()),
        sample_shape=list(model.sample_shape),
        weights_sha256=metadata.weights_sha256(model), steps=steps, batch=batch,
        forward_rows=2 * batch, repetitions=reps, results=summarise(times, batch),
        load_average_1m_at_end=os.getloadavg()[0])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="result JSON (bench/results/…)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    result = run(args.steps, args.batch, args.reps, args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["results"].items():
        print(f"{name:12s} {r['images_per_s']:8.2f} images/s  {r['speedup_vs_eager']:.2f}× eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
