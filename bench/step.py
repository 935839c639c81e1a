"""Benchmark of the fused guided step (docs/design.md §4): each guidance rule's step against the
bytes it must move and against the unfused and the compiled ways of taking the same step.

A case is (size of z = B·D·elem in bytes, storage dtype, noise "given" or "in-kernel", rule); the
rules are the guidance configs of cfgengine.guidance on the paper's ancestral step with v = 0
(DDPM's "fixed small" step, DDIM's η = 1 step), plus a DPM-Solver++(2M)-shaped step (c_p ≠ 0:
x̂_prev read, x̂ written) for the +2 values of a multistep solver:

  cfg        CFG(), clip 1            rescale    CFG(rescale=0.7)      zero_star  ZeroStar()
  apg        APG(eta=0, momentum=−0.5, norm_threshold=15) with its fp32 state
  dynamic    CFG() with DynamicThreshold(0.995, 1.5)
  dpmpp      CFG() on a second-order multistep row (s = 0: no noise either way)

Candidates, all on the same tensors:

  fused      guided_step(impl="auto"): the Triton kernels on CUDA, the torch reference on CPU
  copy       one device copy moving the bytes the fused step must move for that rule (the counts
             above guided_step_reference; DynamicThreshold's quantile not counted): the ceiling
  diffusers  the rule as a diffusers pipeline takes it, eager: chunk, the CFG mix in separate ops,
             diffusers' own rescale_noise_cfg / cfg_zero_star_scale / normalized_guidance
             (+ MomentumBuffer; APG in x̂ space, ε re-derived for the scheduler), then the real
             scheduler step — DDPMScheduler (own noise) or DDIMScheduler (η = 1, given noise), with
             `thresholding=True` for DynamicThreshold, DPMSolverMultistepScheduler (2M) for dpmpp —
             on a scheduler whose alphas_cumprod is our grid, ᾱ = sigmoid(λ)
  compiled   torch.compile of guided_step_reference with the same rule (Inductor fuses too)

Timings: CUDA, triton.testing.do_bench (median, L2 flushed before every run); CPU, the wall-clock
median after warm-up. Figures are ratios against baselines measured in the same run. A CPU run
times the torch reference (CPU "auto"), not the kernel: the kernel's figures need a GPU run.

GPU run, one line:
    python -m cfgengine.bench.step --device cuda --out bench/results/step-cuda-$(date +%F).json
CPU run (small):
    python -m cfgengine.bench.step --sizes 1 --dtypes float32 --noise given
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
from cfgengine.guidance import APG, CFG, DynamicThreshold, ZeroStar
from cfgengine.kernels import RowState, guided_step
from cfgengine.kernels.contract import MIN_COLUMNS
from cfgengine.kernels.reference import guided_step_reference
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
UNMEASURED_GPU = ("GPU figures: unmeasured in this run (device cpu: the torch reference was "
                  "timed, not the Triton kernels); run --device cuda on a GPU")


@dataclasses.dataclass(frozen=True)
class RuleCase:
    """A rule as benchmarked, and the B·D values its fused step moves without noise: in the
    storage dtype, and in fp32 (APG's state; DynamicThreshold's x̂ written and read back)."""
    rule: CFG | ZeroStar | APG
    clip: float | DynamicThreshold
    storage_values: int
    fp32_values: int
    previous: bool = False  # a multistep row: reads x̂_prev, writes x̂ (in place)


RULES = {
    "cfg": RuleCase(CFG(), 1.0, 4, 0),
    "rescale": RuleCase(CFG(rescale=0.7), 1.0, 6, 0),
    "zero_star": RuleCase(ZeroStar(), 1.0, 6, 0),
    "apg": RuleCase(APG(eta=0.0, momentum=-0.5, norm_threshold=15.0), 1.0, 6, 3),
    "dynamic": RuleCase(CFG(), DynamicThreshold(0.995, 1.5), 5, 2),
    "dpmpp": RuleCase(CFG(), 1.0, 6, 0, previous=True),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark point: z of `megabytes` (B·D·elem) in `dtype`, noise given or in-kernel,
    guidance `rule` (a key of RULES)."""
    megabytes: float
    dtype: str
    noise: str
    rule: str = "cfg"

    @property
    def numel(self) -> int:
        """D, the elements of one sample (B = BATCH rows)."""
        return max(1, int(self.megabytes * MB) // (BATCH * DTYPES[self.dtype].itemsize))

    @property
    def bytes_moved(self) -> int:
        """The fused step's traffic for the rule, + n read when noise is given (rows with s ≠ 0)."""
        rule = RULES[self.rule]
        storage = rule.storage_values + (self.noise == "given" and not rule.previous)
        per_row = storage * DTYPES[self.dtype].itemsize + rule.fp32_values * 4
        return per_row * BATCH * self.numel


@dataclasses.dataclass
class StepTensors:
    """The operands every candidate of a case reads, on one device."""
    eps2: torch.Tensor  # (2B, D)
    z: torch.Tensor  # (B, D)
    noise: torch.Tensor | None  # (B, D) or None for in-kernel noise
    table: torch.Tensor  # (T, 6)
    step: int
    case: Case = Case(1, "float32", "given")
    state: torch.Tensor | None = None  # (B, D) fp32, APG's momentum
    x_hat_prev: torch.Tensor | None = None  # (B, D), a multistep row's x̂_prev (and x̂ out)

    @classmethod
    def make(cls, case: Case, device: str) -> "StepTensors":
        gen = torch.Generator(device=device).manual_seed(0)
        dtype, rule = DTYPES[case.dtype], RULES[case.rule]
        randn = lambda rows: torch.randn(rows, case.numel, generator=gen, device=device).to(dtype)
        noise = randn(BATCH) if case.noise == "given" else None
        table = step_table(device, rule.previous)
        state = (torch.zeros(BATCH, case.numel, device=device)
                 if isinstance(rule.rule, APG) else None)
        x_hat_prev = randn(BATCH).clamp(-1, 1) if rule.previous else None
        return cls(randn(2 * BATCH), randn(BATCH), noise, table, STEPS // 2, case, state,
                   x_hat_prev)


def step_table(device: str, previous: bool) -> torch.Tensor:
    """The ancestral v = 0 table as the step takes it, [T, 6]; `previous` gives the middle row a
    second-order multistep shape instead (DDIM η = 0 with c_p = −c_x/4, s = 0): timing depends on
    which terms are non-zero, not on their values."""
    table = coefficient_table(STEPS, "ddim" if previous else "ancestral", v=0.0, device=device)
    if table.shape[1] < MIN_COLUMNS:  # tables built before the c_p column existed
        table = torch.cat([table, torch.zeros_like(table[:, :1])], dim=1)
    if previous:
        table[STEPS // 2, 5] = -0.25 * table[STEPS // 2, 3]
    return table


def fused_candidate(t: StepTensors) -> Callable[[], torch.Tensor]:
    """The engine's step as the sampler calls it (impl="auto"), into a preallocated z'; a
    multistep row updates x̂_prev in place."""
    rule, out = RULES[t.case.rule], torch.empty_like(t.z)
    state = RowState(momentum=t.state, x_hat=t.x_hat_prev)
    return lambda: guided_step(t.eps2, t.z, W, t.table, t.step, rule=rule.rule, clip=rule.clip,
                               state=state, noise=t.noise, out=out)


def copy_candidate(case: Case, device: str) -> Callable[[], torch.Tensor]:
    """A copy whose read + write equal the step's bytes."""
    src = torch.empty(case.bytes_moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def reference_z_next(eps2, z, w, table, step, noise, state, x_hat_prev, rule, clip):
    """guided_step_reference returning z' alone, in the storage dtype (what torch.compile sees)."""
    z_next, _ = guided_step_reference(eps2, z, w, table, step, rule=rule, clip=clip,
                                      state=RowState(momentum=state, x_hat=x_hat_prev),
                                      noise=noise)
    return z_next.to(z.dtype)


@functools.cache
def compiled_reference() -> Callable:
    """One torch.compile of the reference for the whole run: Dynamo recompiles per rule, dtype
    and noise mode and turns sizes dynamic after the first change, instead of compiling every
    case; its recompile limit is raised so no rule silently falls back to eager."""
    dynamo_config = torch._dynamo.config
    if hasattr(dynamo_config, "recompile_limit"):
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    else:
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    return torch.compile(reference_z_next)


def compiled_candidate(t: StepTensors) -> Callable[[], torch.Tensor]:
    """torch.compile of the reference; the step is a 0-d tensor so no step value recompiles it."""
    step, rule = torch.tensor(t.step, device=t.z.device), RULES[t.case.rule]
    return lambda: compiled_reference()(t.eps2, t.z, W, t.table, step, t.noise, t.state,
                                        t.x_hat_prev, rule.rule, rule.clip)


def diffusers_candidate(t: StepTensors) -> Callable[[], torch.Tensor]:
    """The rule the diffusers way (module docstring): eager guidance ops, then the scheduler."""
    rule = RULES[t.case.rule]
    if rule.previous:
        return _diffusers_multistep(t)
    scheduler = diffusers_scheduler("ddpm" if t.noise is None else "ddim", STEPS)
    if isinstance(rule.clip, DynamicThreshold):
        scheduler = _with_thresholding(scheduler, rule.clip)
    timestep = STEPS - 1 - t.step
    extra = {} if t.noise is None else dict(eta=1.0, variance_noise=t.noise,
                                            use_clipped_model_output=True)
    guide = _diffusers_guidance(t, rule.rule)
    image = lambda x: x.unsqueeze(1)  # (B, 1, D): diffusers' thresholding wants a channel axis
    if "variance_noise" in extra:
        extra["variance_noise"] = image(t.noise)

    def step() -> torch.Tensor:
        return scheduler.step(image(guide()), timestep, image(t.z), **extra).prev_sample[:, 0]
    return step


def _diffusers_guidance(t: StepTensors, rule) -> Callable[[], torch.Tensor]:
    """ε̃ from eps2 with diffusers' own functions, guidance_scale = 1 + w."""
    from diffusers.guiders import adaptive_projected_guidance as apg
    from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    scale = 1.0 + W
    alpha, sigma = t.table[t.step, 0], t.table[t.step, 1]
    buffer = apg.MomentumBuffer(rule.momentum) if isinstance(rule, APG) else None

    def guide() -> torch.Tensor:
        eps_c, eps_u = t.eps2.chunk(2)
        if isinstance(rule, APG):  # x̂ space, the paper's formulation; ε re-derived for the step
            d_c, d_u = (t.z - sigma * eps_c) / alpha, (t.z - sigma * eps_u) / alpha
            x_hat = apg.normalized_guidance(d_c, d_u, W, buffer, eta=rule.eta,
                                            norm_threshold=rule.norm_threshold,
                                            use_original_formulation=True)
            return (t.z - alpha * x_hat) / sigma
        if isinstance(rule, ZeroStar):
            eps_u = eps_u * cfg_zero_star_scale(eps_c, eps_u)
        eps = eps_u + scale * (eps_c - eps_u)
        rescale = getattr(rule, "rescale", 0.0)
        return rescale_noise_cfg(eps, eps_c, rescale) if rescale else eps
    return guide


def _with_thresholding(scheduler, clip: DynamicThreshold):
    """The same scheduler with Imagen's dynamic thresholding instead of clip_sample."""
    alphas_cumprod = scheduler.alphas_cumprod
    scheduler = type(scheduler).from_config(scheduler.config, thresholding=True,
                                            clip_sample=False, sample_max_value=clip.max_value,
                                            dynamic_thresholding_ratio=clip.p)
    scheduler.alphas_cumprod = alphas_cumprod
    scheduler.set_timesteps(STEPS)
    return scheduler


def _diffusers_multistep(t: StepTensors) -> Callable[[], torch.Tensor]:
    """DPMSolverMultistepScheduler (DPM-Solver++, order 2) at a middle step on our grid: one
    call first fills its history, then each timed call re-pins its step index (diffusers keeps
    the position inside the scheduler) and takes the second-order step with the CFG mix."""
    import diffusers

    base = diffusers_scheduler("ddim", STEPS)
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        base.config, algorithm_type="dpmsolver++", solver_order=2, final_sets_to_zero=False)
    scheduler.alphas_cumprod = base.alphas_cumprod
    scheduler.set_timesteps(STEPS)
    middle = STEPS // 2

    def step() -> torch.Tensor:
        scheduler._step_index = middle  # private: diffusers has no public way to seek
        eps_c, eps_u = t.eps2.chunk(2)
        eps = eps_u + (1.0 + W) * (eps_c - eps_u)
        return scheduler.step(eps, scheduler.timesteps[middle], t.z).prev_sample
    step()
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


def diffusers_parity(case: Case, device: str) -> float | None:
    """‖diffusers − fused‖/‖fused‖ for given noise, each from fresh tensors (APG's momentum
    starts at zero for both): the baseline takes the same step, η = 1 DDIM being the ancestral
    v = 0 step, for every rule. None for in-kernel noise, whose draws differ by design, and for
    dpmpp, whose row here has a multistep shape, not diffusers' 2M coefficients on this grid."""
    if case.noise != "given" or RULES[case.rule].previous:
        return None
    try:
        baseline = diffusers_candidate(StepTensors.make(case, device))()
    except ImportError:
        return None
    fused = fused_candidate(StepTensors.make(case, device))().double()
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
        diffusers_parity_rel_err=diffusers_parity(case, device))


def noise_comparison(results: list[dict]) -> list[dict]:
    """In-kernel against given noise, per size, dtype and rule: t_given / t_in_kernel (≥ 1 is
    the goal)."""
    key = lambda r: (r["megabytes"], r["dtype"], r["rule"])
    given = {key(r): r for r in results if r["noise"] == "given"}
    rows = []
    for r in results:
        pair = given.get(key(r))
        if r["noise"] == "in-kernel" and pair is not None:
            rows.append(dict(megabytes=r["megabytes"], dtype=r["dtype"], rule=r["rule"],
                             given_over_in_kernel=pair["seconds"]["fused"] / r["seconds"]["fused"]))
    return rows


def goals(results: list[dict], device: str) -> dict:
    """The GPU goals of the plain CFG step, each with the figures that decide it; per rule, the
    fused step's fraction of copy bandwidth (CPU runs report a note)."""
    if device != "cuda":
        return {"note": "GPU goals; not applicable to the CPU path", "gpu": UNMEASURED_GPU}
    cfg = [r for r in results if r["rule"] == "cfg"]
    big = [r for r in cfg if r["megabytes"] >= 64 and r["noise"] == "given"]
    small = [r for r in cfg if r["megabytes"] <= 4]
    ratio = lambda rs, key: [r["ratios"].get(key) for r in rs if key in r["ratios"]]
    return {
        "copy_bandwidth>=0.85_at_64MB+_given": all(x >= 0.85 for x in ratio(big, "fused_vs_copy")),
        "in_kernel_noise_not_slower": all(
            r["given_over_in_kernel"] >= 1.0 for r in noise_comparison(cfg)),
        "diffusers>=5x": all(x >= 5 for x in ratio(cfg, "fused_vs_diffusers")),
        "diffusers>=10x_small": all(x >= 10 for x in ratio(small, "fused_vs_diffusers")),
        "compiled>=1x": all(x >= 1.0 for x in ratio(cfg, "fused_vs_compiled")),
        "copy_fraction_by_rule": {
            rule: min(ratio([r for r in results if r["rule"] == rule], "fused_vs_copy"),
                      default=None) for rule in RULES},
    }


def run(device: str, sizes_mb, dtypes, noise_modes=NOISE_MODES, candidates=CANDIDATES,
        rules=tuple(RULES)) -> dict:
    """Every case, then the summaries; the JSON document written by `main`. A multistep row
    draws no noise (s = 0), so dpmpp runs once per size and dtype."""
    results = []
    for size in sizes_mb:
        for dtype in dtypes:
            for rule in rules:
                modes = noise_modes[-1:] if RULES[rule].previous else noise_modes
                for noise in modes:
                    results.append(bench_case(Case(size, dtype, noise, rule), device, candidates))
                    print(_summary_line(results[-1]), flush=True)
    if device != "cuda":
        print(UNMEASURED_GPU, flush=True)
    return dict(environment(device, TIMER[device]), cases=results,
                in_kernel_vs_given=noise_comparison(results),
                goals=goals(results, device))


def _summary_line(r: dict) -> str:
    ratios = " ".join(f"{k}={v:.2f}" for k, v in r["ratios"].items())
    return f"{r['megabytes']:>6} MB {r['dtype']:>8} {r['noise']:>9} {r['rule']:>9}: {ratios}"


def main(argv: list[str] | None = None) -> int:
    """`python -m cfgengine.bench.step`: run the cases, print one line each, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", type=float, nargs="+", help="MB of z per case (B·D·elem)")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=tuple(DTYPES))
    parser.add_argument("--noise", nargs="+", choices=NOISE_MODES, default=NOISE_MODES)
    parser.add_argument("--rules", nargs="+", choices=tuple(RULES), default=tuple(RULES))
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=CANDIDATES)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=pathlib.Path, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "fused" not in args.candidates:
        parser.error("--candidates must include fused (every ratio is against it)")
    sizes = args.sizes or DEFAULT_SIZES_MB[args.device]
    report = run(args.device, sizes, args.dtypes, tuple(args.noise), args.candidates, args.rules)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
