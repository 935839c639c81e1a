"""ms per forward of the shipped default network under each CPU runtime and precision, each runner
in its OWN process (two runtimes' thread pools in one process disturb each other), 1 thread,
warm-up then the median of timed calls; ratios against eager torch fp32 measured in the same run.
Both clocks are reported: wall ms, and process CPU ms (all of the runner's threads), which a CPU
shared with other work disturbs much less.

    OMP_NUM_THREADS=1 python -m cfgengine.bench.precision_runtimes [--rows 2,16,64] [--calls 15]

Rows are network rows: 2·B for a guided batch of B (B = 1, 8, 32). The int8 graphs use the
cached calibration of export/quantize.py (made on first use, not timed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RUNNERS = ("torch-fp32", "torch-bf16", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32",
           "openvino-int8-qdq", "openvino-int8-nncf", "openvino-bf16", "compile-fp32",
           "compile-bf16")  # the compiled ones last: minutes of compiling on a loaded CPU
BASELINE = "torch-fp32"


def _inputs(model, rows: int):
    import torch

    gen = torch.Generator().manual_seed(rows)
    z = torch.randn((rows, *model.sample_shape), generator=gen)
    logsnr = torch.empty(rows).uniform_(-15.0, 15.0, generator=gen)
    labels = torch.randint(0, model.num_classes + 1, (rows,), generator=gen)
    return z, logsnr, labels


def _torch_runner(model, name: str):
    import torch

    net = torch.compile(model) if name.startswith("compile") else model
    dtype = torch.bfloat16 if name.endswith("bf16") else None

    def run(z, logsnr, labels):
        with torch.inference_mode(), torch.autocast("cpu", dtype or torch.float32,
                                                    enabled=dtype is not None):
            return net(z, logsnr, labels).float()
    return run


def _graph(model, name: str):
    """The engine's own cached graph of the runner's precision (fp32, or int8 for the int8 ones)."""
    from cfgengine.bench.openvino_peer import engine_graph

    return engine_graph(model, "int8" if "int8" in name else "fp32")


def _ort_runner(model, name: str):
    from cfgengine.export import onnx as onnx_export

    return onnx_export.load(_graph(model, name), threads=1)


def _openvino_runner(model, name: str):
    import torch

    from cfgengine.bench.openvino_peer import OpenVinoDenoiser, compile_graph

    precision = "bf16" if name.endswith("bf16") else "int8" if "int8" in name else "fp32"
    if not name.endswith("nncf"):
        return OpenVinoDenoiser(_graph(model, name), precision, threads=1)
    request = compile_graph(_nncf(model, _graph(model, "fp32")), "int8", threads=1) \
        .create_infer_request()

    def run(z, logsnr, labels):
        out = request.infer([z.numpy(), logsnr.numpy(), labels.numpy()])
        return torch.from_numpy(out[0])
    return run


def _nncf(model, fp32_path):
    """NNCF's own post-training quantization of the fp32 graph (an OpenVINO model)."""
    import nncf
    import openvino as ov

    import cfgengine
    from cfgengine.export.quantize import Calibration, calibration_inputs

    calls = calibration_inputs(model, Calibration(), cfgengine.sample)
    return nncf.quantize(ov.Core().read_model(str(fp32_path)),
                         nncf.Dataset(calls, lambda c: list(c)),
                         subset_size=len(calls) * calls[0][0].shape[0])


def child(name: str, rows: list[int], calls: int) -> dict:
    import torch

    import cfgengine

    torch.set_num_threads(1)
    model = cfgengine.load("default").eval()
    build = _torch_runner if name.split("-")[0] in ("torch", "compile") else \
        _ort_runner if name.startswith("onnxruntime") else _openvino_runner
    run = build(model, name)
    ms, cpu_ms = {}, {}
    for n in rows:
        args = _inputs(model, n)
        for _ in range(3):
            run(*args)
        wall, cpu = [], []
        for _ in range(calls):
            start, start_cpu = time.perf_counter(), time.process_time()
            run(*args)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        ms[n], cpu_ms[n] = 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)
    return dict(runner=name, ms=ms, cpu_ms=cpu_ms, uptime=os.getloadavg())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2,16,64")
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=2, help="baseline/runner process pairs")
    parser.add_argument("--runners", default=",".join(RUNNERS[1:]))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    if args.child:
        print(json.dumps(child(args.child, rows, args.calls)))
        return
    print(f"ms per forward, 1 thread, median of {args.calls} calls; ratio = eager torch fp32 "
          f"(the process just before) / runner, median of {args.pairs} process pairs")
    for name in args.runners.split(","):
        pairs = [(_spawn(BASELINE, args), _spawn(name, args)) for _ in range(args.pairs)]
        _print(name, pairs, rows)


def _spawn(name: str, args) -> dict:
    """One runner in a fresh process, 1 thread for torch, OpenMP, ORT and OpenVINO alike."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CFGENGINE_THREADS": "1"}
    cmd = [sys.executable, "-m", "cfgengine.bench.precision_runtimes", "--child", name,
           "--rows", args.rows, "--calls", str(args.calls)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        return dict(error=(done.stderr.strip().splitlines() or ["?"])[-1][:160])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for clock in ("ms", "cpu_ms"):
        result[clock] = {int(n): ms for n, ms in result[clock].items()}  # JSON keys are text
    return result


def _print(name: str, pairs: list[tuple[dict, dict]], rows: list[int]) -> None:
    failed = [r["error"] for pair in pairs for r in pair if "error" in r]
    if failed:
        print(f"{name:20s} failed: {failed[0]}", flush=True)
        return
    load = " ".join(f"{r['uptime'][0]:.1f}" for pair in pairs for r in pair)
    for clock in ("ms", "cpu_ms"):
        cells = []
        for n in rows:
            ms = statistics.median(run[clock][n] for _, run in pairs)
            base = statistics.median(b[clock][n] for b, _ in pairs)
            ratio = statistics.median(b[clock][n] / run[clock][n] for b, run in pairs)
            cells.append(f"{n:3d} rows {ms:7.2f} (eager {base:6.2f}, {ratio:.2f}×)")
        print(f"{name:20s} {clock:6s} " + "  ".join(cells) + f"  load1 {load}", flush=True)


if __name__ == "__main__":
    main()
