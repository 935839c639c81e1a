"""The study of quality per network evaluation: FID / precision / recall against NFE for every
sampler × grid, the guidance rules at large w, and the paper's step-count convention — one command.

    python -m cfgengine.bench.studies.nfe all --estimate   # predicted cost on this machine
    python -m cfgengine.bench.studies.nfe all              # digits and shapes, results + plots
    python -m cfgengine.bench.studies.nfe shapes-samplers  # every sampler (digits-samplers too)

Three parts, each a set of sampling arms scored with `cfgengine eval`'s metrics (classifier
features, class-stratified bootstrap intervals; a difference is called only when intervals are
disjoint):
  A. every sampler of cfgengine/samplers.py (ancestral v = 0.3, DDIM η = 0, the others at their
     defaults) × grids (cosine, cosine-authors, uniform, karras) × NFE budgets, at w ∈ {0.3, 1, 2};
     per combination, the fewest NFE whose FID interval overlaps the one of the paper's sampler at
     T = 256 (ancestral, cosine). A budget of b network evaluations runs the largest T whose step
     plan has at most b rows (Heun and DPM++ 2S a: 2 per step but the last, so T = (b + 1) // 2).
  B. guidance rules at w ∈ {1, 2, 4}: CFG, CFG(rescale=0.7), ZeroStar, APG settings and CFG limited
     to λ intervals (Kynkäänniemi et al. 2024: guidance in the middle of the noise range improves
     FID at equal w while saving compute).
  C. the last evaluation at λmax (cosine) against the authors' grid (cosine-authors) at
     T ∈ {16, 64, 256}, and the noise v = 1 leaves in the output (from the table, exactly).
NFE is counted from the step plan (cfgengine.tables.step_plan), never from a sampler's name: `nfe`
network evaluations per sample (the plan's rows; a guided evaluation is ONE doubled forward) and
`rows` forwarded per sample (2 per doubled evaluation, 1 outside a guidance interval — the FLOPs in
units of one single-row forward). Cells of a stored results.json with identical settings are
reused instead of re-sampled (`reuse`); one of them is re-sampled to check that they still match.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cfgengine.bench.studies.nfe_report import (find_cell, markdown, plot, reused,
                                                stored_cells)
from cfgengine.metrics import Interval, compare
from cfgengine.model import info as model_info
from cfgengine.schedule import LOGSNR_RANGE

# every registered sampler; those not named here run at their defaults (k-diffusion's / diffusers')
SAMPLER_SETTINGS = {"ancestral": {"v": 0.3}, "ddim": {"eta": 0.0}, "dpmpp_2m": {},
                    "euler_ancestral": {}, "heun": {}, "dpmpp_2s_ancestral": {},
                    "dpmpp_2m_sde": {}, "dpmpp_3m_sde": {}, "unipc": {}}
GRID_NAMES = ("cosine", "cosine-authors", "uniform", "karras")
KYNKAANNIEMI = (-0.95, 3.32)  # EDM σ ∈ (0.19, 1.61] as λ = −2·ln σ


@dataclass(frozen=True)
class Arm:
    """One sampling configuration of the study; `rule` names `guidance` in the results."""

    part: str
    sampler: str
    grid: str
    steps: int
    w: tuple[float, ...]
    rule: str = "cfg"
    v: float | None = None

    def settings(self) -> dict:
        extra = dict(SAMPLER_SETTINGS[self.sampler])
        if self.v is not None:
            extra["v"] = self.v
        return extra


@dataclass(frozen=True)
class NfeStudyConfig:
    """One dataset's study: the model, samples per cell and the arms' axes."""

    data: str
    model: str  # "default", or "train" for a tiny model trained like the first study's
    n: int  # class-balanced samples per (arm, w) cell
    steps: tuple[int, ...] = (8, 16, 32, 64, 128, 256)  # part A: NFE budgets (= T at 1 NFE/step)
    samplers: tuple[str, ...] = tuple(SAMPLER_SETTINGS)
    grids: tuple[str, ...] = GRID_NAMES
    w_samplers: tuple[float, ...] = (0.3, 1.0, 2.0)
    w_rules: tuple[float, ...] = (1.0, 2.0, 4.0)
    rules: tuple[str, ...] = ("cfg", "rescale-0.7", "zero_star", "apg", "apg-momentum",
                              "interval-kynkaanniemi", "interval-low", "interval-high")
    rule_steps: int = 64
    convention_steps: tuple[int, ...] = (16, 64, 256)
    reference_steps: int = 256
    max_steps_per_arm: int = 256  # arms of part A above this T are left out (said in results)
    rounds: int = 200
    seed: int = 0
    batch_size: int = 1000
    out: str = "bench/results/nfe-study"
    reuse: str | None = None  # a results.json whose cells of identical settings are reused
    notes: tuple[str, ...] = field(default=())


STUDIES: dict[str, NfeStudyConfig] = {
    # sized for about an hour of one loaded 2-core CPU (both studies); the cuts are in `notes`
    "digits": NfeStudyConfig(data="digits", model="train", n=300, steps=(8, 16, 32, 64, 128, 256),
                             max_steps_per_arm=128,
                             notes=("part A arms stop at T = 128 (NFE 8–128); only the reference "
                                    "(ancestral, cosine) runs at T = 256",)),
    # the default model costs ~20× a digits row: fewer samples, one w in part A, T ≤ 32
    "shapes": NfeStudyConfig(data="shapes", model="default", n=120, steps=(8, 16, 32, 256),
                             max_steps_per_arm=32, w_samplers=(1.0,), w_rules=(1.0, 4.0),
                             rule_steps=32, convention_steps=(16,),
                             notes=("shapes is cut to fit the CPU (the default model costs ~20× "
                                    "a digits row): 120 samples per cell, part A at w = 1 only "
                                    "and T ≤ 32 (the reference at 256), rules at w = 1 and 4 "
                                    "with T = 32, the convention at T = 16 only",)),
    "quick": NfeStudyConfig(data="digits", model="tiny-random", n=24, steps=(4, 8),
                            samplers=("ancestral", "heun", "dpmpp_2m"), grids=("cosine", "karras"),
                            w_samplers=(1.0,), w_rules=(2.0,), rules=("cfg", "interval-low"),
                            rule_steps=4, convention_steps=(4,), reference_steps=8, rounds=20,
                            out="nfe-study-quick"),
}



def every_sampler(round2: NfeStudyConfig, grids: tuple[str, ...]) -> NfeStudyConfig:
    """Round 3: part A for every sampler at budgets 8/16/32 (the reference at T = 256), with the
    round-2 study's model, samples and w, so that its cells of the old samplers are reused."""
    return replace(round2, steps=(8, 16, 32, 256), max_steps_per_arm=32, grids=grids, rules=(),
                   convention_steps=(), samplers=tuple(SAMPLER_SETTINGS),
                   out="bench/results/nfe-study/samplers",
                   reuse=f"{round2.out}/{round2.data}/results.json",
                   notes=(f"every sampler, {' and '.join(grids)} grid(s), NFE budgets 8/16/32 "
                          "(the reference: ancestral at T = 256); the cells of ancestral, ddim "
                          f"and dpmpp_2m are the round-2 {round2.data} run's (identical "
                          "settings); no rules, no convention part",))


STUDIES["shapes-samplers"] = every_sampler(STUDIES["shapes"], ("cosine", "karras"))
STUDIES["digits-samplers"] = every_sampler(STUDIES["digits"], ("cosine",))


def guidance_rule(name: str):
    """The guidance object of a named rule (None is plain CFG)."""
    from cfgengine import APG, CFG, ZeroStar

    rules = {"cfg": CFG(), "rescale-0.7": CFG(rescale=0.7), "zero_star": ZeroStar(),
             "apg": APG(eta=0.0, norm_threshold=15.0),
             "apg-momentum": APG(eta=0.0, momentum=-0.5, norm_threshold=15.0),
             "interval-kynkaanniemi": CFG(interval=KYNKAANNIEMI),
             "interval-low": CFG(interval=(-20.0, 0.0)), "interval-high": CFG(interval=(0.0, 20.0))}
    return rules[name]


def plan_of(arm: Arm, logsnr_range=LOGSNR_RANGE, final_logsnr: float = math.inf):
    """The arm's cfgengine.tables.StepPlan: what the Sampler runs for it."""
    from cfgengine.tables import grid_logsnr, step_plan

    extra = arm.settings()
    v, eta = extra.pop("v", 0.3), extra.pop("eta", None)
    return step_plan(grid_logsnr(arm.steps, grid=arm.grid, logsnr_range=logsnr_range),
                     arm.sampler, v=v, eta=eta, options=extra, rule=guidance_rule(arm.rule),
                     final_logsnr=final_logsnr)


def steps_within(sampler: str, grid: str, budget: int) -> int:
    """The largest T ≥ 2 whose step plan makes at most `budget` network evaluations."""
    return next(t for t in range(budget, 1, -1)
                if plan_of(Arm("A", sampler, grid, t, ())).rows <= budget)


def arms(study: NfeStudyConfig) -> list[Arm]:
    """Every arm of the three parts; an arm shared by two parts is sampled once."""
    a = [Arm("A", s, g, steps_within(s, g, b), study.w_samplers) for s, g, b in
         itertools.product(study.samplers, study.grids, study.steps)
         if b <= study.max_steps_per_arm or (s, g, b) == ("ancestral", "cosine",
                                                         study.reference_steps)]
    b = [Arm("B", "ancestral", "cosine", study.rule_steps, study.w_rules, rule)
         for rule in study.rules]
    c = [Arm("C", "ancestral", g, t, study.w_samplers, v=None if v == 0.3 else v)
         for g, t, v in itertools.product(("cosine", "cosine-authors"), study.convention_steps,
                                          (0.3, 1.0))]
    unique, seen = [], set()
    for arm in a + b + c:
        key = dataclasses.astuple(replace(arm, part=""))
        if key not in seen:
            seen.add(key)
            unique.append(arm)
    return unique


def evaluations(arm: Arm, logsnr_range=LOGSNR_RANGE,
                final_logsnr: float = math.inf) -> tuple[int, int]:
    """(network evaluations, rows forwarded) per sample, from the arm's step plan: a doubled
    evaluation forwards 2 rows, one outside the rule's interval 1."""
    plan = plan_of(arm, logsnr_range, final_logsnr)
    return plan.rows, plan.rows + sum(plan.doubled)


def residual_noise(grid: str, steps: int, v: float) -> tuple[float, float]:
    """(noise the last transition injects into z_{T−1}, the largest noise the last prediction
    x̂ = (z − σ·ε̃)/α can still remove), both in uint8 levels of the output: s_{T−2}/α_{T−1} and
    σ_{T−1}/α_{T−1}. Where the second is ≪ the first (λ_{T−1} = λmax), the injected noise stays in
    the sample."""
    from cfgengine.tables import coefficient_table

    table = coefficient_table(steps, "ancestral", v=v, grid=grid).double()
    alpha_last, sigma_last = table[-1, 0], table[-1, 1]
    return (float(table[-2, 4] / alpha_last * 127.5), float(sigma_last / alpha_last * 127.5))


# ---------------------------------------------------------------------------------------------
# Sampling and scoring


@dataclass
class Scorer:
    """The feature space, reference statistics and bootstrap settings shared by every cell."""

    extractor: object
    reference: object
    radii: np.ndarray
    eval_config: object


def make_scorer(model, study: NfeStudyConfig, ckpt: str) -> Scorer:
    from cfgengine import evaluate, metrics

    config = evaluate.EvalConfig((ckpt,), w=(0.0,), n=max(study.n, 4), seed=study.seed,
                                 rounds=study.rounds)
    extractor, key = evaluate.load_extractor(None, model.dataset)
    ref = metrics.reference(model.dataset, extractor, key, evaluate._cache_dir(config))
    return Scorer(extractor, ref, metrics.knn_radii(ref.features, config.k), config)


def sample_arm(model, arm: Arm, study: NfeStudyConfig):
    """uint8 images, labels and w of one arm: every w of it in one sampling pass."""
    from cfgengine import evaluate, sample
    from cfgengine.figures import to_uint8_images

    labels = evaluate.cell_labels(study.n, model.num_classes).repeat(len(arm.w))
    w = torch.tensor(arm.w).repeat_interleave(study.n)
    x = sample(model, labels, w=w, steps=arm.steps, sampler=arm.sampler, grid=arm.grid,
               guidance=guidance_rule(arm.rule), seed=study.seed, batch_size=study.batch_size,
               **arm.settings())
    return to_uint8_images(x), labels.numpy(), w.numpy()


def score(images, labels, w, scorer: Scorer, config) -> list[dict]:
    """`cfgengine eval`'s scores of one sampled pass, one row per w."""
    from cfgengine import evaluate, metrics
    from cfgengine.data import from_uint8

    features, probs = metrics.extract(scorer.extractor, from_uint8(images))
    totals = evaluate.cell_moments(features, w, config, scorer.reference)
    return evaluate.score_configuration(features, probs, labels, w, totals, scorer.reference,
                                        scorer.radii, config)


def run_arm(model, arm: Arm, study: NfeStudyConfig, scorer: Scorer) -> list[dict]:
    from cfgengine import evaluate

    start = time.perf_counter()
    images, labels, w = sample_arm(model, arm, study)
    seconds = time.perf_counter() - start
    config = replace(scorer.eval_config, w=arm.w)
    rows = score(images, labels, w, scorer, config)
    info = model_info(model)
    nfe, forwarded = evaluations(arm, info.logsnr_range, info.final_logsnr)
    base = dict(dataclasses.asdict(arm), nfe=nfe, rows=forwarded,
                seconds=seconds / len(arm.w))
    return [dict(base, **row) for row in rows]


def load_model(study: NfeStudyConfig):
    """(model, checkpoint path) of the study."""
    import cfgengine

    if study.model == "default":
        return cfgengine.load("default"), "default"
    if study.model == "tiny-random":  # the quick study: a barely trained tiny net
        from cfgengine.train import TrainConfig, train

        out = Path(study.out) / "model"
        train(TrainConfig(data=study.data, preset="tiny", steps=2, batch_size=8, out=str(out)))
        return cfgengine.load(out / "model.safetensors"), str(out / "ckpt.pt")
    from cfgengine.bench.studies.fid_w import StudyConfig, train_models

    (ckpt,) = train_models(StudyConfig(data=study.data, p_uncond=(0.2,)))
    return cfgengine.load(ckpt), ckpt


# ---------------------------------------------------------------------------------------------
# Findings


def _interval(cell: dict, metric: str = "fid") -> Interval:
    return Interval(**cell[metric])


def fewest_nfe(cells: list[dict], study: NfeStudyConfig) -> list[dict]:
    """Per (sampler, grid, w): the fewest T whose FID is not significantly worse than the
    reference's — its interval overlaps the reference's, or lies wholly below it."""
    out = []
    for sampler, grid, w in itertools.product(study.samplers, study.grids, study.w_samplers):
        ref = find_cell(cells, sampler="ancestral", grid="cosine", steps=study.reference_steps, w=w,
                    rule="cfg", v=None)
        arm_cells = sorted((c for c in cells if c["sampler"] == sampler and c["grid"] == grid
                            and c["w"] == w and c["rule"] == "cfg" and c["v"] is None),
                           key=lambda c: c["nfe"])
        match = next((c for c in arm_cells if ref is not None
                      and _interval(c).low <= _interval(ref).high), None)
        out.append(dict(sampler=sampler, grid=grid, w=w,
                        fewest_nfe=None if match is None else match["nfe"],
                        fewest_rows=None if match is None else match.get("rows"),
                        reference_fid=None if ref is None else ref["fid"]["value"]))
    return out


def recommend(matches: list[dict]) -> dict | None:
    """The (sampler, grid) whose worst case over w needs the fewest NFE to match the reference."""
    worst = {}
    for m in matches:
        key = (m["sampler"], m["grid"])
        nfe = m["fewest_nfe"] if m["fewest_nfe"] is not None else float("inf")
        worst[key] = max(worst.get(key, 0), nfe)
    (sampler, grid), nfe = min(worst.items(), key=lambda item: item[1])
    return None if nfe == float("inf") else dict(sampler=sampler, grid=grid, steps=int(nfe))


def rule_findings(cells: list[dict], study: NfeStudyConfig) -> list[dict]:
    """Each rule against plain CFG at the same w: FID, precision, recall, accuracy verdicts."""
    out = []
    for rule, w in itertools.product(study.rules, study.w_rules):
        cell = find_cell(cells, rule=rule, w=w, steps=study.rule_steps, sampler="ancestral")
        base = find_cell(cells, rule="cfg", w=w, steps=study.rule_steps, sampler="ancestral",
                     grid="cosine", v=None)
        if cell is None or base is None or rule == "cfg":
            continue
        verdicts = {m: compare(_interval(cell, m), _interval(base, m))
                    for m in ("fid", "precision", "recall", "accuracy") if m in cell}
        out.append(dict(rule=rule, w=w, rows=cell["rows"], cfg_rows=base["rows"],
                        **{f"{m}_vs_cfg": v for m, v in verdicts.items()}))
    return out


def interval_claim(findings: list[dict]) -> dict:
    """Kynkäänniemi et al.: guidance limited to the middle of the noise range lowers FID at equal
    w while saving compute. Holds where FID is significantly lower; contradicted where higher."""
    rows = [f for f in findings if f["rule"] == "interval-kynkaanniemi"]
    verdicts = [f["fid_vs_cfg"] for f in rows]
    verdict = ("holds" if verdicts and all(v == "lower" for v in verdicts) else
               "contradicted" if "higher" in verdicts else
               "holds in part" if "lower" in verdicts else "inconclusive")
    return dict(claim="guidance interval lowers FID at equal w with fewer rows", verdict=verdict,
                cells=rows)


def convention(cells: list[dict], study: NfeStudyConfig) -> list[dict]:
    """cosine (last evaluation at λmax) against cosine-authors, per T and v: FID verdict and the
    residual noise of the last transition."""
    out = []
    for t, v, w in itertools.product(study.convention_steps, (0.3, 1.0), study.w_samplers):
        a = find_cell(cells, grid="cosine", steps=t, w=w, rule="cfg", sampler="ancestral",
                  v=None if v == 0.3 else v)
        b = find_cell(cells, grid="cosine-authors", steps=t, w=w, rule="cfg", sampler="ancestral",
                  v=None if v == 0.3 else v)
        if a is None or b is None:
            continue
        noise_a, noise_b = residual_noise("cosine", t, v), residual_noise("cosine-authors", t, v)
        out.append(dict(steps=t, v=v, w=w, fid_cosine=a["fid"], fid_authors=b["fid"],
                        cosine_vs_authors=compare(_interval(a), _interval(b)),
                        injected_levels_cosine=noise_a[0], removable_levels_cosine=noise_a[1],
                        injected_levels_authors=noise_b[0], removable_levels_authors=noise_b[1]))
    return out


def check_reuse(model, cells: list[dict], study: NfeStudyConfig, scorer: Scorer) -> dict | None:
    """Re-sample the cheapest reused arm: its FIDs now against the stored ones (equal when the
    engine still draws the same samples)."""
    old = [c for c in cells if c.get("reused")]
    if not old:
        return None
    cheapest = min(old, key=lambda c: c["rows"])
    arm = Arm(**{f.name: cheapest[f.name] for f in dataclasses.fields(Arm)}
              | {"w": (cheapest["w"],)})
    (now,) = run_arm(model, arm, study, scorer)
    return dict(arm=dataclasses.asdict(arm), stored_fid=cheapest["fid"], resampled_fid=now["fid"])


def run_study(study: NfeStudyConfig, log=print) -> dict:
    """Sample and score every arm (or reuse its stored cells), judge, write results.json /
    results.md / fid_vs_nfe.png."""
    start = time.perf_counter()
    model, ckpt = load_model(study)
    scorer = make_scorer(model, study, ckpt)
    cells, stored, plan = [], stored_cells(study), arms(study)
    for i, arm in enumerate(plan):
        old = reused(arm, stored)
        cells += old or run_arm(model, arm, study, scorer)
        log(f"[{i + 1}/{len(plan)}] {arm} " + ("reused" if old else
                                               f"in {cells[-1]['seconds'] * len(arm.w):.1f} s"))
    result = dict(study=json.loads(json.dumps(dataclasses.asdict(study))), ckpt=ckpt,
                  cells=cells, reuse_check=check_reuse(model, cells, study, scorer),
                  device=f"CPU {platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch thread(s)", seconds=time.perf_counter() - start,
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    return write(judge(result, study), study)


def judge(result: dict, study: NfeStudyConfig) -> dict:
    """`result` with every finding computed from its cells."""
    cells = result["cells"]
    result["fewest_nfe"] = fewest_nfe(cells, study)
    result["recommendation"] = recommend(result["fewest_nfe"])
    result["rules"] = rule_findings(cells, study)
    result["interval_claim"] = interval_claim(result["rules"])
    result["convention"] = convention(cells, study)
    return result


def write(result: dict, study: NfeStudyConfig) -> dict:
    """results.json, results.md and fid_vs_nfe.png in OUT/DATA, together or not at all."""
    from cfgengine.atomic import atomic_paths

    out = Path(study.out) / study.data
    out.mkdir(parents=True, exist_ok=True)
    with atomic_paths(out / "results.json", out / "results.md", out / "fid_vs_nfe.png") as paths:
        Path(paths[0]).write_text(json.dumps(result, indent=1) + "\n")
        Path(paths[1]).write_text(markdown(result))
        plot(result, Path(paths[2]))
    return result


def estimate(study: NfeStudyConfig) -> float:
    """Predicted seconds: rows forwarded by every arm × the measured cost of a row on this
    machine, plus ~4 s of metrics per cell."""
    model, _ = load_model(study) if study.model != "train" else (None, None)
    if model is None:
        from cfgengine.unet import UNet, preset

        model = UNet(preset("tiny", image_size=8, in_channels=1, num_classes=10)).eval()
    batch = min(512, study.batch_size)
    z, lam = torch.randn(batch, *model.sample_shape), torch.zeros(batch)
    labels = torch.zeros(batch, dtype=torch.long)
    with torch.inference_mode():
        model(z, lam, labels)
        start = time.perf_counter()
        model(z, lam, labels)
    per_row = (time.perf_counter() - start) / batch
    stored = stored_cells(study)
    plan = [a for a in arms(study) if reused(a, stored) is None]
    rows = sum(evaluations(a)[1] * study.n * len(a.w) for a in plan)
    cells = sum(len(a.w) for a in plan)
    print(f"{study.data}: {len(plan)} arms to sample, {cells} cells, {rows / 1e6:.1f} M rows at "
          f"{per_row * 1e3:.3f} ms/row")
    return rows * per_row + 4.0 * cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfgengine.bench.studies.nfe",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=(*STUDIES, "all"), help="digits, shapes, all or quick")
    parser.add_argument("--estimate", action="store_true", help="print the predicted cost only")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--out", default=None, help="results folder (default: the study's)")
    parser.add_argument("--rejudge", action="store_true",
                        help="recompute the findings from an existing results.json (no sampling)")
    args = parser.parse_args(argv)
    from cfgengine.bench.studies.fid_w import _thread_limits

    names = ("digits", "shapes") if args.name == "all" else (args.name,)
    with _thread_limits(args.threads):
        for name in names:
            study = STUDIES[name] if args.out is None else replace(STUDIES[name], out=args.out)
            if args.estimate:
                print(f"{name}: about {estimate(study) / 60:.1f} min on this machine")
            elif args.rejudge:
                stored = Path(study.out) / study.data / "results.json"
                result = write(judge(json.loads(stored.read_text()), study), study)
                print(f"{name}: recommended {result['recommendation']}")
            else:
                result = run_study(study)
                print(f"{name}: recommended {result['recommendation']}; interval claim "
                      f"{result['interval_claim']['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
