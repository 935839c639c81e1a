"""End-to-end benchmark of guided sampling (issue 7): images/s of the engine's backends against the
baselines of cfgengine.bench.baselines, on the same model, device and precision, in one process.

For every cell (runner, precision, batch B, steps T) it reports images/s, ms per step, the network
floor t_forward(2B) (one doubled forward, timed alone in the same rounds as T forwards back to
back, like the loop it bounds), the efficiency η(T) = T·t_forward(2B)/t_total, and each engine
backend's speed-up over every baseline; per (runner, precision, B) the least-squares fit
t_total = a + b·T. Warm-up (compilation, CUDA-graph capture) is excluded; every figure is the
median of `repeats` rounds in which all runners and floors of the cell run in rotating order, so drift of a shared machine cancels in the ratios.
Whole loops are timed with CUDA events after a synchronise on CUDA, wall clock on CPU.

GPU sweep, one line (all backends, fp32/bf16/fp16, T ∈ {16, 64, 256, 1024}, B ∈ {1…128}):
    cfgengine bench --sweep gpu --out-dir bench/results
CPU: `cfgengine bench --quick` (under 2 minutes on 2 cores), `cfgengine bench --sweep cpu`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cfgengine import rng
from cfgengine.bench import baselines, timing
from cfgengine.precision import PRECISIONS
from cfgengine.bench.workload import SAMPLER_ARGS, Workload, bench_model, make_workload, \
    schedule
from cfgengine.kernels import CounterNoise, RowState, guided_step
from cfgengine.model import info as model_info
from cfgengine.guidance import GuidedDenoiser
from cfgengine.cudagraph import capture
from cfgengine.sampler import Sampler
from cfgengine.unet import PRESETS

ENGINE_BACKENDS = ("auto", "torch", "compile", "onnxruntime", "cudagraph")
FLOOR_CALLS = 16  # forwards per floor timing (T of them when T is smaller): the floor is a per-call
# figure, and T = 256 forwards back to back per round made the CPU sweep twice as long
EXPORTED = ("onnx", "aoti")  # cfgengine.export formats, swept when that package provides them
BASELINES = {
    "baseline1": "two forwards per step + unfused step (lucidrains' forward_with_cond_scale)",
    "baseline2": "diffusers pipeline loop: cat([z]*2), one forward, CFG mix, scheduler.step",
    "baseline3": "baseline2 with the network in torch.compile",
}
PEERS = {  # other runtimes on the engine's own loop and step, timed only in processes of their own
    "openvino": "the engine's loop and step, the network compiled by OpenVINO from the engine's "
                "cached ONNX graph (fp32, or the int8 QDQ graph) — bench/openvino_peer.py",
}
TIMER = {"cuda": "CUDA events around a whole loop (and around T floor forwards) after synchronize",
         "cpu": "wall clock around a whole loop (and around T floor forwards)"}


@dataclass(frozen=True)
class SweepConfig:
    """What one `cfgengine bench` run measures (w is the paper's; guidance_scale = 1 + w)."""

    model: str = "default"
    device: str = "cpu"
    steps: tuple[int, ...] = (16, 64, 256)
    batches: tuple[int, ...] = (1, 8)
    backends: tuple[str, ...] = ("torch", "compile")
    precisions: tuple[str, ...] = ("fp32",)
    baselines: tuple[str, ...] = tuple(BASELINES)
    peers: tuple[str, ...] = ()  # PEERS, at every precision; only with processes > 0
    exported: tuple[str, ...] = ()
    sampler: str = "ancestral"
    w: float = 0.3
    repeats: int = 5
    seed: int = 0
    threads: int | None = None  # torch CPU threads during the sweep; None = torch's default
    processes: int = 0  # > 0: each runner in its own processes, this many each (bench/isolated.py)


SWEEPS: dict[str, SweepConfig] = {
    # torch.compile takes minutes on a shared 2-core CPU, so the quick sweep leaves it out. One
    # thread: on a loaded 2-core machine torch's two OpenMP threads spin against the other
    # processes, which made the quick sweep 5x slower and far noisier than one thread.
    "quick": SweepConfig(steps=(16, 64), batches=(1,), backends=("torch",),
                         baselines=("baseline1", "baseline2"), repeats=3, threads=1),
    # issue 27: the engine as a user gets it (auto) at fp32, bf16 and int8 against the eager and
    # the compiled diffusers loop (fp32), every runner in its own processes, one thread per side.
    # T = 16 keeps the sweep near 10 minutes on a loaded 2-core CPU (B = 32 is 64 rows a forward).
    "cpu": SweepConfig(steps=(16,), batches=(1, 8, 32), backends=("auto",),
                       precisions=("fp32", "bf16", "int8"), baselines=("baseline2", "baseline3"),
                       peers=("openvino",), repeats=2, threads=1, processes=2),
    # the exported runtimes (ONNX Runtime, AOTInductor) against eager torch, no peers
    "exported": SweepConfig(steps=(64,), batches=(16,), backends=("torch",), baselines=(),
                            exported=EXPORTED, repeats=3, threads=2),
    # bench/gpu_check.py, sized for a short GPU lease: η(T) of the loops at B = 1, then a short
    # sweep against every baseline and exported runtime
    "gpu-eta": SweepConfig(device="cuda", steps=(16, 64, 256, 1024), batches=(1,),
                           backends=("torch", "cudagraph"), baselines=("baseline2",), repeats=3),
    "gpu-short": SweepConfig(device="cuda", steps=(64,), batches=(1, 8, 64),
                             backends=ENGINE_BACKENDS, precisions=("fp32", "bf16"),
                             exported=EXPORTED, repeats=3),
    "gpu": SweepConfig(device="cuda", steps=(16, 64, 256, 1024), batches=(1, 2, 4, 8, 32, 128),
                       backends=ENGINE_BACKENDS, precisions=("fp32", "bf16", "fp16"),
                       exported=EXPORTED),
}


FLAGS = {  # SweepConfig field → `cfgengine bench` flag
    "model": "--model", "device": "--device", "steps": "--steps", "batches": "--batch",
    "backends": "--backends", "precisions": "--precisions", "baselines": "--baselines",
    "peers": "--peers", "exported": "--exported", "sampler": "--sampler", "w": "--w",
    "repeats": "--repeats", "seed": "--seed", "threads": "--threads", "processes": "--processes"}


def check_config(config: SweepConfig) -> SweepConfig:
    """`config` if it can run here; else ValueError naming the first bad field."""
    choices = dict(model=("default", *PRESETS), device=("cpu", "cuda"), sampler=tuple(SAMPLER_ARGS))
    for field, allowed in choices.items():
        if getattr(config, field) not in allowed:
            raise ValueError(f"{field} must be one of {', '.join(allowed)}, "
                             f"got {getattr(config, field)!r}")
    subsets = dict(backends=ENGINE_BACKENDS, precisions=tuple(PRECISIONS),
                   baselines=tuple(BASELINES), peers=tuple(PEERS), exported=EXPORTED)
    for field, allowed in subsets.items():
        bad = [x for x in getattr(config, field) if x not in allowed]
        if bad:
            raise ValueError(f"{field}: {bad[0]!r} is not one of {', '.join(allowed)}")
    if min(config.steps) < 2 or min(config.batches) < 1 or config.repeats < 1:
        raise ValueError("steps must be ≥ 2, batch sizes ≥ 1 and repeats ≥ 1")
    if config.processes < 0:
        raise ValueError(f"processes must be ≥ 0 (0: one process), got {config.processes}")
    if config.threads is not None and config.threads < 1:
        raise ValueError(f"threads must be ≥ 1, got {config.threads}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested, but this torch has no usable CUDA")
    return config


def command_line(config: SweepConfig, sweep: str) -> str:
    """The `cfgengine bench` line that reruns `config`: the preset plus the fields it changes."""
    preset = SWEEPS[sweep]
    parts = ["cfgengine bench", "--quick" if sweep == "quick" else f"--sweep {sweep}"]
    for field, flag in FLAGS.items():
        value = getattr(config, field)
        if value != getattr(preset, field):
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            parts.append(f"{flag} {text}")
    return " ".join(parts)


@dataclass(frozen=True)
class Runner:
    """One way of sampling a Workload: `run(T, sampler)` gives x̂ [B, *S]; `forward()` is its doubled
    forward alone (the floor), shared by runners whose network call is the same (named `floor`)."""

    name: str
    role: str  # "engine" or "baseline"
    floor: str
    run: Callable[[int, str], torch.Tensor]
    forward: Callable[[], torch.Tensor]
    warm_per_steps: bool = False  # CUDA graphs are captured per T, so each T needs its warm-up


def engine_runner(name: str, model, work: Workload, floor: str) -> Runner:
    """cfgengine's Sampler on `model` (a net, or an exported backend) with backend `name`."""
    backend = name if name in ENGINE_BACKENDS else None
    engine = Sampler(model, device=work.device, backend=backend, precision=work.precision)
    engine.model.warm()  # auto/onnxruntime: time it with its cache warm

    def run(steps: int, sampler: str) -> torch.Tensor:
        return engine.sample(work.labels, w=work.w, steps=steps, sampler=sampler,
                             **SAMPLER_ARGS[sampler], seed=work.seed)
    forward = _doubled_forward(functools.partial(engine.model.eps, doubled=True), work)
    if name == "cudagraph":
        forward = capture(_doubled_forward(GuidedDenoiser(work.net), work)).replay
    return Runner(f"cfgengine/{name}", "engine", floor, run, forward, name == "cudagraph")


def _doubled_forward(guided, work: Workload) -> Callable[[], torch.Tensor]:
    """One call of a doubled-batch callable (z[B], λ[B], labels[B]) → eps2[2B] at a mid-grid λ."""
    z, logsnr = work.z0(), torch.zeros(work.batch, device=work.device)

    def forward() -> torch.Tensor:
        with work.autocast():
            return guided(z, logsnr, work.labels)  # (2B, *S)
    return forward


def baseline_runners(work: Workload, names: tuple[str, ...]) -> tuple[list[Runner], list[dict]]:
    """(the requested baselines, [{runner, reason}] for those that cannot run here)."""
    runners, skipped = [], []
    if "baseline1" in names:
        eager = _doubled_forward(GuidedDenoiser(work.net), work)
        runners.append(Runner("baseline1", "baseline", "eager", baselines.TwoForwardLoop(work),
                              eager))
    for name, compiled in (("baseline2", False), ("baseline3", True)):
        if name not in names:
            continue
        if importlib.util.find_spec("diffusers") is None:
            skipped.append(dict(runner=name, reason="diffusers is missing (the [bench] extra)"))
            continue
        loop = baselines.DiffusersLoop(work, compiled)
        z2 = torch.cat([work.z0()] * 2)  # (2B, *S)
        forward = functools.partial(loop.forward, z2, torch.zeros((), device=work.device))
        runners.append(Runner(name, "baseline", "compiled-net" if compiled else "eager", loop,
                              forward))
    return runners, skipped


def engine_runners(work: Workload, config: SweepConfig, workdir: Path
                   ) -> tuple[list[Runner], list[dict]]:
    """The engine on each requested backend (and exported format); skips carry their reason."""
    floors = {"torch": "eager", "compile": "compiled", "cudagraph": "cudagraph", "auto": "auto",
              "onnxruntime": "onnxruntime"}
    runners, skipped = [], []
    for name in config.backends:
        if name == "cudagraph" and work.device.type != "cuda":
            skipped.append(dict(runner=f"cfgengine/{name}", reason="needs a CUDA device"))
            continue
        runners.append(engine_runner(name, work.net, work, floors[name]))
    for fmt in config.exported:
        backend = exported_backend(fmt, work, workdir)
        if isinstance(backend, str):
            skipped.append(dict(runner=f"cfgengine/{fmt}", reason=backend))
        else:
            runners.append(engine_runner(fmt, backend, work, fmt))
    return runners, skipped


def single_runner(name: str, work: Workload, workdir: Path) -> Runner | str:
    """The runner `name` (an engine backend, an exported format or a baseline) for `work`, or
    the reason it cannot run here."""
    pick = lambda names: tuple(n for n in names if n == name)
    config = SweepConfig(device=work.device.type, backends=pick(ENGINE_BACKENDS),
                         exported=pick(EXPORTED), baselines=pick(BASELINES))
    engine, skipped = engine_runners(work, config, workdir)
    base, skipped_base = baseline_runners(work, config.baselines)
    runners, skipped = engine + base, skipped + skipped_base
    return runners[0] if runners else skipped[0]["reason"]


def exported_backend(fmt: str, work: Workload, workdir: Path):
    """The loaded backend of `work.net` exported as `fmt`, or the reason it cannot be swept (a
    str) — the module is absent, lacks export/load, or the export fails (missing extra,
    unsupported precision)."""
    try:
        module = importlib.import_module(f"cfgengine.export.{fmt}")
    except ImportError as err:
        return f"cfgengine.export.{fmt} is not available ({err})"
    if not (callable(getattr(module, "export", None)) and callable(getattr(module, "load", None))):
        return f"cfgengine.export.{fmt} provides no export(...)/load(...)"
    suffix = {"onnx": ".onnx", "aoti": ".pt2"}[fmt]
    path = workdir / f"{work.precision}-b{work.batch}{suffix}"
    device = dict(device=str(work.device)) if fmt == "aoti" else {}
    try:
        module.export(work.net, path, precision=work.precision, max_batch=2 * work.batch, **device)
        return module.load(path, device=work.device)
    except (ImportError, RuntimeError, ValueError) as err:
        return f"cfgengine.export.{fmt}: {type(err).__name__}: {err}".splitlines()[0]


def measure_cell(runners: list[Runner], work: Workload, steps: int,
                 config: SweepConfig) -> list[dict]:
    """Median seconds of every runner's whole loop and of every floor, in interleaved rounds."""
    device = config.device
    for runner in runners:
        if runner.warm_per_steps:
            runner.run(steps, config.sampler)
    timers = {r.name: functools.partial(timing.time_once, functools.partial(
        r.run, steps, config.sampler), device) for r in runners}
    floors = {r.floor: r.forward for r in reversed(runners)}  # one timer per distinct forward
    calls = min(steps, FLOOR_CALLS)
    timers |= {f"floor:{k}": functools.partial(timing.time_once, functools.partial(
        _repeat, fn, calls), device) for k, fn in floors.items()}
    steps_only = step_loop(work, steps, config.sampler)
    steps_only()  # warm-up: allocator, first-call dispatch
    timers["step"] = functools.partial(timing.time_once, steps_only, device)
    seconds = timing.interleaved(timers, config.repeats)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    medians |= {k: v / calls for k, v in medians.items() if k.startswith("floor:")}
    medians["step"] /= steps
    return [cell_record(r, work, steps, seconds[r.name], medians) for r in runners]


def step_loop(work: Workload, steps: int, sampler: str) -> Callable[[], torch.Tensor]:
    """The T steps of the engine's loop without its network: the step plan, the noise drawn as
    the Sampler draws it (rng.StepNoise on CPU, in-kernel on CUDA) and guided_step on a fixed
    eps2 — what the loop adds to T forwards. Its share of the loop is the issue-13 "step share"."""
    plan = schedule(steps, sampler)
    table, _ = plan.on(work.device)
    z0, ids = work.z0(), torch.arange(work.batch, device=work.device)
    eps2 = 0.5 * torch.cat([z0, z0.flip(0)])  # (2B, *S): any finite ε; the step's cost is fixed
    w = torch.full((work.batch,), work.w, device=work.device)
    clip = model_info(work.net).clip

    def run() -> torch.Tensor:
        drawn = rng.StepNoise(work.seed, ids, tuple(z0.shape[1:]), steps) \
            if work.device.type == "cpu" else None
        state = RowState.zeros_like(z0, plan.state)
        z = z0
        for t in range(steps):
            noise = CounterNoise(work.seed, ids) if drawn is None else drawn[t]
            z = guided_step(eps2, z, w, table, t, clip=clip, state=state, noise=noise)
        return z
    return run


def _repeat(fn: Callable, times: int) -> None:
    """Forwards back to back: the floor is timed like the loop it bounds."""
    for _ in range(times):
        fn()


def cell_record(runner: Runner, work: Workload, steps: int, seconds: list[float],
                medians: dict) -> dict:
    """One row of the result: the figures of `runner` at T = `steps` against the cell's medians."""
    total, floor = medians[runner.name], medians[f"floor:{runner.floor}"]
    row = dict(runner=runner.name, role=runner.role, precision=work.precision, batch=work.batch,
               steps=steps, seconds=total, images_per_s=work.batch / total,
               images_steps_per_s=work.batch * steps / total,
               seconds_all=seconds, floor=runner.floor, t_forward_2B=floor,
               eta=steps * floor / total, ms_per_step=1e3 * total / steps)
    if runner.role == "engine":  # the engine's own step (a baseline's step is its own code)
        row |= dict(t_step=medians["step"], step_share=steps * medians["step"] / total)
        row["speedup"] = {name: medians[name] / total for name in BASELINES if name in medians}
    return row


def parity(runners: list[Runner], steps: int) -> dict[str, float]:
    """‖x̂_runner − x̂_first‖/‖x̂_first‖ with DDIM η = 0 from the same z_0: deterministic, so it
    shows that every runner takes the same T steps on the same grid (up to float rounding). With
    random weights most pixels of x̂ clip to ±1, so the figure speaks for the unclipped rest."""
    outputs = {r.name: r.run(steps, "ddim").double() for r in runners}
    ref = next(iter(outputs.values()))
    return {name: float((x - ref).norm() / ref.norm()) for name, x in outputs.items()}


def sweep(config: SweepConfig, progress: bool = True) -> dict:
    """Run every cell of `config`; the result document (environment, cells, fits, goals)."""
    threads, env = torch.get_num_threads(), os.environ.get("CFGENGINE_THREADS")
    torch.set_num_threads(config.threads or threads)
    os.environ["CFGENGINE_THREADS"] = str(config.threads or threads)  # ONNX Runtime's sessions
    try:
        return _sweep(config, progress)
    finally:
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("CFGENGINE_THREADS", None)
        else:
            os.environ["CFGENGINE_THREADS"] = env


def _sweep(config: SweepConfig, progress: bool) -> dict:
    env = timing.environment(config.device, TIMER[config.device])
    net, source = bench_model(config.model, config.device)
    cells, skipped, checks = [], [], {}
    cell_count = len(config.precisions) * len(config.batches) * len(config.steps)
    bar = _progress(progress, cell_count)
    with tempfile.TemporaryDirectory(prefix="cfgengine-bench-") as workdir:
        for precision in config.precisions:
            for batch in config.batches:
                work = make_workload(net, config.device, precision, batch, w=config.w,
                                     seed=config.seed)
                runners, why = _runners(work, config, Path(workdir))
                skipped += [s for s in why if s not in skipped]
                checks[f"{precision} B={batch}"] = _warm_up(runners, config)
                for steps in config.steps:
                    bar.set_postfix_str(f"{precision} B={batch} T={steps}")
                    cells += measure_cell(runners, work, steps, config)
                    bar.update()
    bar.close()
    skipped += [dict(runner=p, reason="a peer runs only in processes of its own (--processes "
                     "1 or more)") for p in config.peers]
    return dict(env, load_average_after=timing.load_average(),
                config=dataclasses.asdict(config), model=source, baselines=BASELINES,
                cells=cells, fits=fits(cells), goals=goals(cells), parity_ddim=checks,
                skipped=skipped)


def _runners(work: Workload, config: SweepConfig, workdir: Path):
    engine, skip_engine = engine_runners(work, config, workdir)
    base, skip_base = baseline_runners(work, config.baselines)
    if not engine:
        raise ValueError("no engine backend of this sweep can run here: "
                         + "; ".join(s["reason"] for s in skip_engine))
    return engine + base, skip_engine + skip_base


def _warm_up(runners: list[Runner], config: SweepConfig) -> dict[str, float]:
    """First calls (compilation, allocator) outside every timing: the DDIM parity run at the
    smallest T (the sweep's sampler runs the same network and step code)."""
    return parity(runners, min(config.steps))


def _progress(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="cell", disable=not enabled, desc="cfgengine bench")


def fits(cells: list[dict]) -> list[dict]:
    """Per (runner, precision, B): t_total = a + b·T by least squares, and how far images·steps/s
    strays from its median across T (the ±5 % goal)."""
    groups: dict[tuple, list[dict]] = {}
    for row in cells:
        groups.setdefault((row["runner"], row["precision"], row["batch"]), []).append(row)
    return [_fit(key, rows) for key, rows in groups.items()]


def _fit(key: tuple, rows: list[dict]) -> dict:
    steps = np.array([r["steps"] for r in rows], dtype=float)
    seconds = np.array([r["seconds"] for r in rows])
    b, a = np.polyfit(steps, seconds, 1) if len(rows) > 1 else (seconds[0] / steps[0], 0.0)
    rate = [r["images_steps_per_s"] for r in rows]
    mid = statistics.median(rate)
    return dict(runner=key[0], precision=key[1], batch=key[2], a_seconds=float(a),
                b_seconds_per_step=float(b), steps=steps.astype(int).tolist(),
                images_steps_per_s_spread=max(max(rate) / mid - 1, 1 - min(rate) / mid))


GOALS = {  # name: (baseline, target speed-up, which cells)
    "images/s >= 2.5x baseline2 at B <= 8": ("baseline2", 2.5, "small"),
    "images/s >= 1.3x baseline2 at the best-throughput B": ("baseline2", 1.3, "best"),
    "images/s >= 3x baseline1": ("baseline1", 3.0, "all"),
    "images/s >= 1.1x baseline3": ("baseline3", 1.1, "all"),
    "images/s >= 2.0x baseline2": ("baseline2", 2.0, "all"),  # issue 13, CPU
    "images/s >= 1.3x baseline3": ("baseline3", 1.3, "all"),  # issue 13, CPU
}
CONSTANCY_GOAL = 0.05  # images·steps/s within ±5 % across T
STEP_SHARE_GOAL = 0.03  # issue 13: the step (with its noise) at most 3 % of the loop


def goals(cells: list[dict]) -> dict[str, dict]:
    """Per engine runner, each goal's worst case over the cells it covers and whether it is met
    (None where its baseline was not measured)."""
    engines = sorted({r["runner"] for r in cells if r["role"] == "engine"})
    return {name: _runner_goals([r for r in cells if r["runner"] == name]) for name in engines}


def _runner_goals(rows: list[dict]) -> dict:
    result = {}
    for goal, (baseline, target, which) in GOALS.items():
        ratios = [r["speedup"][baseline] for r in _goal_cells(rows, which)
                  if baseline in r["speedup"]]
        worst = min(ratios) if ratios else None
        result[goal] = dict(target=target, worst=worst, met=None if worst is None
                            else worst >= target)
    spread = max(f["images_steps_per_s_spread"] for f in fits(rows))
    result["images·steps/s within ±5% across T"] = dict(
        target=CONSTANCY_GOAL, worst=spread, met=spread <= CONSTANCY_GOAL)
    share = max(r["step_share"] for r in rows)
    result["step share <= 3%"] = dict(target=STEP_SHARE_GOAL, worst=share,
                                      met=share <= STEP_SHARE_GOAL)
    return result


def _goal_cells(rows: list[dict], which: str) -> list[dict]:
    """All cells, those with B ≤ 8, or per (precision, T) the cell of highest images/s."""
    if which == "all":
        return rows
    if which == "small":
        return [r for r in rows if r["batch"] <= 8]
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["precision"], r["steps"])
        if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
            best[key] = r
    return list(best.values())
