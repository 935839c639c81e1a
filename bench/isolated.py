"""The end-to-end sweep with every runner in its OWN process (issue 27): two runtimes' thread pools
in one process disturb each other, so in-process ratios swing with the load. Each process loads the
model, builds one runner (an engine backend at one precision, or a baseline at fp32), warms it up
(compilation, calibration, allocator) and then times whole loops at every (B, T) of the sweep; the
runners alternate process by process, in rotating order, `processes` times each, so drift of a
shared machine falls on all of them alike. Each cell also carries its FLOPs (the network's, counted
once per cell with torch.utils.flop_counter on one doubled forward, times T) and GFLOP/s against a
GEMM roofline measured in a process of its own.

    cfgengine bench --sweep cpu                     # engine and OpenVINO peer at fp32/bf16/int8
                                                    # against baseline2/3
    cfgengine bench --sweep cpu --precision int8    # one precision
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cfgengine import cpu
from cfgengine.bench import harness, openvino_peer, timing
from cfgengine.bench.workload import bench_model, make_workload
from cfgengine.guidance import GuidedDenoiser

WARM_STEPS = 2  # the warm-up loop: compiles, calibrates and allocates like a long one
FLOOR_CALLS = 4  # doubled forwards per floor timing, per process
GEMM_SIZE = 1024  # the roofline's square matmul (2·n³ FLOPs per call)


def runner_specs(config: harness.SweepConfig) -> list[dict]:
    """Every runner of the sweep: the engine and the peers (harness.PEERS) at each precision,
    then the baselines at fp32 (they run the network as a diffusers user does; lower precision is
    the engine's offer)."""
    engine = [dict(runner=b, precision=p) for p in config.precisions
              for b in (*config.backends, *config.peers)]
    return engine + [dict(runner=b, precision="fp32") for b in config.baselines]


def sweep(config: harness.SweepConfig, progress: bool = True) -> dict:
    """The result document of `config` (harness.sweep's schema, plus FLOPs, roofline and the pids
    of the processes each figure came from), every runner timed in its own processes."""
    env = timing.environment(config.device, harness.TIMER[config.device])
    env["cpu_threads"] = config.threads or env["cpu_threads"]
    roofline = _spawn(dict(roofline=True), config)
    specs, slow = _payable(runner_specs(config), config.device)
    runs = {}
    bar = harness._progress(progress, config.processes * len(specs))
    for round_ in range(config.processes):
        shift = round_ % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            bar.set_postfix_str(f"{spec['runner']} {spec['precision']}")
            runs.setdefault(_key(spec), []).append(_spawn(spec, config))
            bar.update()
    bar.close()
    net, source = bench_model(config.model, config.device)
    flops = {b: forward_flops(net, config.device, b, config) for b in config.batches}
    cells, skipped = _cells(specs, runs, flops, roofline)
    skipped = slow + skipped
    return dict(env, load_average_after=timing.load_average(),
                config=dataclasses.asdict(config), model=source, baselines=harness.BASELINES,
                isolation="each runner in its own processes, alternating", roofline=roofline,
                cells=cells, fits=harness.fits(cells), goals=goals(cells),
                precision_goals=precision_goals(cells), skipped=skipped)


def _payable(specs: list[dict], device: str) -> tuple[list[dict], list[dict]]:
    """(the specs worth timing, [{runner, reason}] of those left out): on a CPU without native
    bf16 the network runs emulated at a few % of fp32 (see the roofline's bf16 GEMM rate), and
    one B = 32 loop would take minutes."""
    keep, slow = [], []
    for spec in specs:
        why = cpu.unsupported(spec["precision"]) if device == "cpu" else None
        if why is None:
            keep.append(spec)
        else:
            slow.append(dict(runner=f"{_name(spec)} {spec['precision']}", reason=why))
    return keep, slow


def _key(spec: dict) -> tuple[str, str]:
    """(runner name, precision): what one runner of the sweep is."""
    return _name(spec), spec["precision"]


def _name(spec: dict) -> str:
    runner = spec["runner"]
    return runner if runner in (*harness.BASELINES, *harness.PEERS) else f"cfgengine/{runner}"


def _role(name: str) -> str:
    """"baseline", "peer" (another runtime on the engine's loop) or "engine"."""
    return "baseline" if name in harness.BASELINES else "peer" if name in harness.PEERS \
        else "engine"


def _spawn(spec: dict, config: harness.SweepConfig) -> dict:
    """One child process; its JSON document, or {error} with the child's last line."""
    threads = str(config.threads or torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "CFGENGINE_THREADS": threads}
    job = json.dumps(dict(spec, config=dataclasses.asdict(config)))
    done = subprocess.run([sys.executable, "-m", "cfgengine.bench.isolated", job], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        return dict(error=(done.stderr.strip().splitlines() or ["no output"])[-1][:200])
    return json.loads(done.stdout.strip().splitlines()[-1])


def forward_flops(net, device: str, batch: int, config: harness.SweepConfig) -> int:
    """FLOPs of one doubled forward (2B rows) of `net`, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    work = make_workload(net, device, "fp32", batch, w=config.w, seed=config.seed)
    forward = harness._doubled_forward(GuidedDenoiser(net), work)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        forward()
    return counter.get_total_flops()


def _cells(specs: list[dict], runs: dict, flops: dict, roofline: dict
           ) -> tuple[list[dict], list[dict]]:
    """harness.cell_record rows from the children's timings, speed-ups within the sweep."""
    skipped, timed = [], {}
    for spec in specs:
        done = runs[_key(spec)]
        bad = [r for r in done if "error" in r or "skipped" in r]
        if bad:
            skipped.append(dict(runner=" ".join(_key(spec)),
                                reason=bad[0].get("error") or bad[0]["skipped"]))
        else:
            timed[_key(spec)] = done
    baselines = {k[0]: _medians(v) for k, v in timed.items() if k[0] in harness.BASELINES}
    rounds = {k[0]: v for k, v in timed.items() if k[0] in harness.BASELINES}
    rows = []
    for (name, precision), done in timed.items():
        for key, m in _medians(done).items():
            row = _row(name, precision, key, m, baselines, flops, roofline, done)
            if row["role"] != "baseline":
                row["speedup_by_round"] = {b: _by_round(done, base, key)
                                           for b, base in rounds.items()}
            rows.append(row)
    return _against_engine(rows), skipped


def _against_engine(rows: list[dict]) -> list[dict]:
    """Each peer row with `speedup_over_engine`: engine seconds / peer seconds for every engine
    runner of the same precision, B and T (above 1: the peer's runtime is the faster here)."""
    cell = lambda r: (r["precision"], r["batch"], r["steps"])
    for peer in (r for r in rows if r["role"] == "peer"):
        peer["speedup_over_engine"] = {e["runner"]: e["seconds"] / peer["seconds"] for e in rows
                                       if e["role"] == "engine" and cell(e) == cell(peer)}
    return rows


def _medians(done: list[dict]) -> dict[tuple[int, int], dict]:
    """Per (B, T): the median loop, floor and step seconds over every process's timed calls."""
    cells: dict[tuple[int, int], dict] = {}
    for run in done:
        for c in run["cells"]:
            cell = cells.setdefault((c["batch"], c["steps"]), dict(all=[], floor=[], step=[]))
            cell["all"] += c["seconds_all"]
            cell["floor"].append(c["t_forward_2B"])
            cell["step"] += [c["t_step"]] if c.get("t_step") is not None else []
    return {k: dict(v, seconds=statistics.median(v["all"])) for k, v in cells.items()}


def _by_round(engine: list[dict], peer: list[dict], key: tuple[int, int]) -> list[float]:
    """Per round (the i-th process of each runner, run close in time): peer / engine median
    seconds — how far one round's ratio strays when the machine's load changes between rounds."""
    def seconds(run: dict) -> float:
        return statistics.median(next(c["seconds_all"] for c in run["cells"]
                                      if (c["batch"], c["steps"]) == key))
    return [seconds(b) / seconds(e) for e, b in zip(engine, peer)]


def _row(name: str, precision: str, key: tuple[int, int], m: dict, baselines: dict,
         flops: dict, roofline: dict, done: list[dict]) -> dict:
    batch, steps = key
    total, floor = m["seconds"], statistics.median(m["floor"])
    row = dict(runner=name, role=_role(name), precision=precision,
               batch=batch, steps=steps, seconds=total, images_per_s=batch / total,
               images_steps_per_s=batch * steps / total, seconds_all=m["all"],
               floor=f"{name} {precision}", t_forward_2B=floor, eta=steps * floor / total,
               ms_per_step=1e3 * total / steps, pids=[r["pid"] for r in done],
               flops=steps * flops[batch], gflops_per_s=steps * flops[batch] / total / 1e9)
    rate = roofline.get("gflops_per_s", {}).get(precision)
    row["roofline_fraction"] = row["gflops_per_s"] / rate if rate else None
    if row["role"] != "baseline":  # the engine's step, on the engine's or a peer's network
        t_step = statistics.median(m["step"])
        row |= dict(t_step=t_step, step_share=steps * t_step / total,
                    speedup={b: base[key]["seconds"] / total for b, base in baselines.items()
                             if key in base})
    return row


def goals(cells: list[dict]) -> dict[str, dict]:
    """harness's goals per engine runner and precision ("cfgengine/auto int8")."""
    keys = sorted({(r["runner"], r["precision"]) for r in cells if r["role"] == "engine"})
    return {f"{n} {p}": harness._runner_goals([r for r in cells if (r["runner"], r["precision"])
                                              == (n, p)]) for n, p in keys}


PRECISION_GOALS = {  # issue 27: (baseline, target, batches) for the faster of bf16 and int8
    "faster of bf16/int8 >= 2.5x baseline2 at B = 1": ("baseline2", 2.5, (1,)),
    "faster of bf16/int8 >= 2.0x baseline2 at B = 8, 32": ("baseline2", 2.0, (8, 32)),
    "faster of bf16/int8 >= 1.3x baseline3 at B = 8, 32": ("baseline3", 1.3, (8, 32)),
}


def precision_goals(cells: list[dict]) -> dict[str, dict]:
    """Each issue-27 goal: per B the faster low-precision engine cell's speed-up, the worst over
    the goal's B and T, and whether it is met (None where nothing was measured)."""
    result = {}
    for goal, (baseline, target, batches) in PRECISION_GOALS.items():
        best: dict[tuple[int, int], float] = {}
        for r in cells:
            if r["role"] == "engine" and r["precision"] in ("bf16", "int8") \
                    and r["batch"] in batches and baseline in r["speedup"]:
                key = (r["batch"], r["steps"])
                best[key] = max(best.get(key, 0.0), r["speedup"][baseline])
        worst = min(best.values()) if best else None
        result[goal] = dict(target=target, worst=worst, met=None if worst is None
                            else worst >= target)
    return result


def child(job: dict) -> dict:
    """In the child: time one runner at every (B, T) of the sweep (or the GEMM roofline)."""
    config = harness.SweepConfig(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in job["config"].items()})
    torch.set_num_threads(config.threads or torch.get_num_threads())
    if job.get("roofline"):
        return dict(pid=os.getpid(), **gemm_roofline())
    net, _ = bench_model(config.model, config.device)
    cells = []
    with tempfile.TemporaryDirectory(prefix="cfgengine-bench-") as workdir:
        for batch in config.batches:
            work = make_workload(net, config.device, job["precision"], batch, w=config.w,
                                 seed=config.seed)
            runner = openvino_peer.peer_runner(job["runner"], work) \
                if job["runner"] in harness.PEERS \
                else harness.single_runner(job["runner"], work, Path(workdir))
            if isinstance(runner, str):
                return dict(pid=os.getpid(), skipped=runner)
            cells += [_time_cell(runner, work, steps, config) for steps in config.steps]
    return dict(pid=os.getpid(), runner=job["runner"], precision=job["precision"], cells=cells,
                load_average=timing.load_average())


def _time_cell(runner: harness.Runner, work, steps: int, config: harness.SweepConfig) -> dict:
    """Warm-up, then `repeats` whole loops, the floor forward and (engine) the step alone."""
    clock = functools.partial(timing.time_once, device=config.device)
    runner.run(WARM_STEPS, config.sampler)
    runner.forward()
    loops = [clock(functools.partial(runner.run, steps, config.sampler))
             for _ in range(config.repeats)]
    floor = clock(functools.partial(harness._repeat, runner.forward, FLOOR_CALLS)) / FLOOR_CALLS
    t_step = None
    if runner.role != "baseline":
        steps_only = harness.step_loop(work, steps, config.sampler)
        steps_only()
        t_step = clock(steps_only) / steps
    return dict(batch=work.batch, steps=steps, seconds_all=loops, t_forward_2B=floor,
                t_step=t_step)


def gemm_roofline() -> dict[str, dict]:
    """GFLOP/s of a square GEMM per precision on this process's threads, in the runtime that runs
    that precision here: torch for fp32 and bf16, ONNX Runtime's MatMulInteger (u8·s8) for int8
    (torch._int_mm where ONNX Runtime is missing) — the rate a network can at best reach."""
    gen = torch.Generator().manual_seed(0)
    calls = {"fp32": ("torch.mm", lambda n: functools.partial(torch.mm, *[torch.randn(
                 n, n, generator=gen)] * 2)),
             "bf16": ("torch.mm bf16", lambda n: functools.partial(torch.mm, *[torch.randn(
                 n, n, generator=gen).bfloat16()] * 2))}
    try:
        import onnxruntime  # noqa: F401 — the int8 engine's runtime

        calls["int8"] = ("onnxruntime MatMulInteger", _ort_int8_gemm)
    except ImportError:
        calls["int8"] = ("torch._int_mm", lambda n: functools.partial(torch._int_mm, *[
            torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen)] * 2))
    rates, sizes = {}, {}
    for name, (_, make) in calls.items():
        sizes[name], seconds = _sized(make)
        rates[name] = 2 * sizes[name] ** 3 / seconds / 1e9
    return dict(gflops_per_s=rates, gemm_size=sizes, gemm={k: v[0] for k, v in calls.items()})


def _sized(make) -> tuple[int, float]:
    """(n, fastest seconds) of the GEMM of the largest n ≤ GEMM_SIZE whose call stays under
    0.05 s: a slow emulated precision must not take minutes of the sweep."""
    n = 128
    while True:
        seconds = _best_seconds(make(n))
        if n >= GEMM_SIZE or seconds > 0.05:
            return n, seconds
        n *= 2


def _ort_int8_gemm(n: int):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(name, kind, [n, n]) for name, kind in
          (("a", TensorProto.UINT8), ("b", TensorProto.INT8), ("c", TensorProto.INT32))]
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "gemm",
                              io[:2], io[2:])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 13)]).SerializeToString(), options,
        providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = dict(a=rng.integers(0, 256, (n, n), dtype=np.uint8),
                 b=rng.integers(-128, 128, (n, n), dtype=np.int8))
    return functools.partial(session.run, None, feeds)


def _best_seconds(fn, calls: int = 3) -> float:
    """The fastest of a few calls after one warm-up: the rate the core can reach."""
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
