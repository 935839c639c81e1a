"""Benchmark of the fused guided step (docs/design.md §4): the step against the bytes it must move and
against the unfused and the compiled ways of taking the same step.

A case is (size of z = B·D·elem in bytes, storage dtype, noise "given" or "in-kernel"); every
candidate takes the same step — the paper's ancestral step with v = 0, which is DDPM's "fixed small"
step and DDIM's η = 1 step — on the same tensors:

  fused      guided_step(impl="auto"): the Triton kernel on CUDA, the torch reference on CPU
  copy       one device copy moving the step's bytes, 5·B·D·elem with noise read, 4·B·D·elem with
             in-kernel noise (half read, half written): the bandwidth ceiling
  diffusers  the step as a diffusers pipeline takes it: chunk, the CFG mix in separate ops, then the
             real DDPMScheduler.step (draws its own noise) or DDIMScheduler.step (η = 1, given noise),
             on a scheduler whose alphas_cumprod is our grid, ᾱ = sigmoid(λ)
  compiled   torch.compile of guided_step_reference (Inductor fuses too)

Timings: CUDA, triton.testing.do_bench (median, L2 flushed before every run); CPU, the wall-clock
median after warm-up. Figures are ratios against baselines measured in the same run.

GPU run, one line:
    python -m cfgengine.bench.step --device cuda --out bench/results/step-cuda-$(date +%F).json
CPU run (the committed figures):
    python -m cfgengine.bench.step --out bench/results/step-cpu-$(date +%F).json
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
from typing import Callable

import torch

from cfgengine.bench.baselines import diffusers_scheduler
from cfgengine.bench.timing import CPU_MIN_REPS, CPU_MIN_SECONDS, environment, time_seconds
from cfgengine.kernels.fused_step import guided_step, guided_step_reference
from cfgengine.tables import coefficient_table

MB = 2**20
STEPS = 50  # the grid; every case times the step in its middle
BATCH = 8
W = 0.3  # the paper's w; diffusers' guidance_scale is 1 + w
CANDIDATES = ("fused", "copy", "diffusers", "compiled")
DEFAULT_SIZES_MB = {"cuda": (1, 4, 16, 64, 256), "cpu": (1, 4)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NOISE_MODES = ("given", "in-kernel")
TIMER = {"cuda": "triton.testing.do_bench median, L2 flushed",
         "cpu": f"wall-clock median of ≥ {CPU_MIN_REPS} calls (≥ {CPU_MIN_SECONDS} s) after 2 "
                "warm-up calls"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark point: z of `megabytes` (B·D·elem) in `dtype`, noise given or in-kernel."""
    megabytes: float
    dtype: str
    noise: str

    @property
    def numel(self) -> int:
        """D, the elements of one sample (B = BATCH rows)."""
        return max(1, int(self.megabytes * MB) // (BATCH * DTYPES[self.dtype].itemsize))

    @property
    def bytes_moved(self) -> int:
        """The fused step's traffic: ε_c, ε_u, z (and n) read, z' written."""
        values = 5 if self.noise == "given" else 4
        return values * BATCH * self.numel * DTYPES[self.dtype].itemsize


@dataclasses.dataclass
class StepTensors:
    """The operands every candidate of a case reads, on one device."""
    eps2: torch.Tensor  # (2B, D)
    z: torch.Tensor  # (B, D)
    noise: torch.Tensor | None  # (B, D) or None for in-kernel noise
    table: torch.Tensor  # (T, 5)
    step: int

    @classmethod
    def make(cls, case: Case, device: str) -> "StepTensors":
        gen = torch.Generator(device=device).manual_seed(0)
        dtype, shape = DTYPES[case.dtype], (BATCH, case.numel)
        randn = lambda rows: torch.randn(rows, case.numel, generator=gen, device=device).to(dtype)
        noise = randn(BATCH) if case.noise == "given" else None
        table = coefficient_table(STEPS, "ancestral", v=0.0, device=device)
        return cls(randn(2 * shape[0]), randn(BATCH), noise, table, STEPS // 2)


def fused_candidate(t: StepTensors) -> Callable[[], torch.Tensor]:
    """The engine's step as the sampler calls it (impl="auto"), into a preallocated z'."""
    out = torch.empty_like(t.z)
    return lambda: guided_step(t.eps2, t.z, W, t.table, t.step, clip=1.0, noise=t.noise, out=out)


def copy_candidate(case: Case, device: str) -> Callable[[], torch.Tensor]:
    """A copy whose read + write equal the step's bytes."""
    src = torch.empty(case.bytes_moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def reference_z_next(eps2, z, w, table, step, noise):
    """guided_step_reference returning z' alone, in the storage dtype (what torch.compile sees)."""
    z_next, _ = guided_step_reference(eps2, z, w, table, step, clip=1.0, noise=noise)
    return z_next.to(z.dtype)


@functools.cache
def compiled_reference() -> Callable:
    """One torch.compile of the reference for the whole run: Dynamo recompiles per dtype and
    noise mode and turns sizes dynamic after the first change, instead of compiling every case."""
    return torch.compile(reference_z_next)


def compiled_candidate(t: StepTensors) -> Callable[[], torch.Tensor]:
    """torch.compile of the reference; the step is a 0-d tensor so no step value recompiles it."""
    step = torch.tensor(t.step, device=t.z.device)
    return lambda: compiled_reference()(t.eps2, t.z, W, t.table, step, t.noise)


def diffusers_candidate(t: StepTensors) -> Callable[[], torch.Tensor]:
    """Chunk, mix ε = ε_u + g·(ε_c − ε_u) in separate ops, then the scheduler's step, as a
    diffusers pipeline's loop body does it. Given noise goes through DDIM's variance_noise."""
    scheduler = diffusers_scheduler("ddpm" if t.noise is None else "ddim", STEPS)
    timestep = STEPS - 1 - t.step
    extra = {} if t.noise is None else dict(eta=1.0, variance_noise=t.noise,
                                            use_clipped_model_output=True)

    def step() -> torch.Tensor:
        eps_c, eps_u = t.eps2.chunk(2)
        eps = eps_u + (1.0 + W) * (eps_c - eps_u)
        return scheduler.step(eps, timestep, t.z, **extra).prev_sample
    return step


def build_candidate(name: str, case: Case, t: StepTensors, device: str):
    """The zero-argument callable timing `name`, or None where its library is missing."""
    if name == "fused":
        return fused_candidate(t)
    if name == "copy":
        return copy_candidate(case, device)
    if name == "compiled":
        return compiled_candidate(t)
    try:
        return diffusers_candidate(t)
    except ImportError:
        return None


def diffusers_parity(case: Case, t: StepTensors) -> float | None:
    """‖diffusers − fused‖/‖fused‖ for given noise: the baseline takes the same step (η = 1 DDIM
    is the ancestral v = 0 step); None for in-kernel noise, whose draws differ by design."""
    if t.noise is None:
        return None
    try:
        baseline = diffusers_candidate(t)()
    except ImportError:
        return None
    fused = fused_candidate(t)().double()
    return ((baseline.double() - fused).norm() / fused.norm()).item()


def bench_case(case: Case, device: str, candidates=CANDIDATES) -> dict:
    """Every candidate's median seconds on one case, and the fused step's ratios against them."""
    tensors = StepTensors.make(case, device)
    seconds = {}
    for name in candidates:
        fn = build_candidate(name, case, tensors, device)
        if fn is not None:
            seconds[name] = time_seconds(fn, device)
    fused = seconds["fused"]
    return dict(
        dataclasses.asdict(case), batch=BATCH, numel=case.numel, bytes_moved=case.bytes_moved,
        seconds=seconds, bandwidth_GBps={k: case.bytes_moved / v / 1e9 for k, v in seconds.items()},
        ratios={f"fused_vs_{k}": v / fused for k, v in seconds.items() if k != "fused"},
        diffusers_parity_rel_err=diffusers_parity(case, tensors))


def noise_comparison(results: list[dict]) -> list[dict]:
    """In-kernel against given noise, per size and dtype: t_given / t_in_kernel (≥ 1 is the goal)."""
    given = {(r["megabytes"], r["dtype"]): r for r in results if r["noise"] == "given"}
    rows = []
    for r in results:
        pair = given.get((r["megabytes"], r["dtype"]))
        if r["noise"] == "in-kernel" and pair is not None:
            rows.append(dict(megabytes=r["megabytes"], dtype=r["dtype"],
                             given_over_in_kernel=pair["seconds"]["fused"] / r["seconds"]["fused"]))
    return rows


def goals(results: list[dict], device: str) -> dict:
    """The issue's GPU goals, each with the figures that decide it (CPU runs report None)."""
    if device != "cuda":
        return {"note": "GPU goals; not applicable to the CPU path"}
    big = [r for r in results if r["megabytes"] >= 64 and r["noise"] == "given"]
    small = [r for r in results if r["megabytes"] <= 4]
    ratio = lambda rs, key: [r["ratios"].get(key) for r in rs if key in r["ratios"]]
    return {
        "copy_bandwidth>=0.85_at_64MB+_given": all(x >= 0.85 for x in ratio(big, "fused_vs_copy")),
        "in_kernel_noise_not_slower": all(
            r["given_over_in_kernel"] >= 1.0 for r in noise_comparison(results)),
        "diffusers>=5x": all(x >= 5 for x in ratio(results, "fused_vs_diffusers")),
        "diffusers>=10x_small": all(x >= 10 for x in ratio(small, "fused_vs_diffusers")),
        "compiled>=1x": all(x >= 1.0 for x in ratio(results, "fused_vs_compiled")),
    }


def run(device: str, sizes_mb, dtypes, noise_modes=NOISE_MODES, candidates=CANDIDATES) -> dict:
    """Every case, then the summaries; the JSON document written by `main`."""
    results = []
    for size in sizes_mb:
        for dtype in dtypes:
            for noise in noise_modes:
                results.append(bench_case(Case(size, dtype, noise), device, candidates))
                print(_summary_line(results[-1]), flush=True)
    return dict(environment(device, TIMER[device]), cases=results,
                in_kernel_vs_given=noise_comparison(results),
                goals=goals(results, device))


def _summary_line(r: dict) -> str:
    ratios = " ".join(f"{k}={v:.2f}" for k, v in r["ratios"].items())
    return f"{r['megabytes']:>6} MB {r['dtype']:>8} {r['noise']:>9}: {ratios}"


def main(argv: list[str] | None = None) -> int:
    """`python -m cfgengine.bench.step`: run the cases, print one line each, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", type=float, nargs="+", help="MB of z per case (B·D·elem)")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=tuple(DTYPES))
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=CANDIDATES)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=pathlib.Path, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "fused" not in args.candidates:
        parser.error("--candidates must include fused (every ratio is against it)")
    sizes = args.sizes or DEFAULT_SIZES_MB[args.device]
    report = run(args.device, sizes, args.dtypes, candidates=args.candidates)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
