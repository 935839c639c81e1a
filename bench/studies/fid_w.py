"""The FID/IS-versus-w study (issue 8; Ho & Salimans 2022, §4.2 and Table 1) on our data, as one
command: train one model per p_uncond (same preset and budget), evaluate every (p_uncond, T, w) cell
with `cfgengine eval`, and test the paper's four claims (docs/paper.md) with bootstrap intervals — a
difference whose intervals overlap is reported as inconclusive.

    python -m cfgengine.bench.studies.fid_w full --estimate  # predicted cost here, then exit
    python -m cfgengine.bench.studies.fid_w full             # train (or reuse), evaluate, judge
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cfgengine.evaluate import PAPER_W, EvalConfig, run_eval, write_report
from cfgengine.metrics import Interval, compare


@dataclass(frozen=True)
class StudyConfig:
    """Models (p_uncond values, one preset, one training budget) and the evaluation grid."""

    data: str = "digits"
    preset: str = "tiny"
    train_steps: int = 3000
    batch_size: int = 64
    p_uncond: tuple[float, ...] = (0.1, 0.2, 0.5)
    w: tuple[float, ...] = PAPER_W
    steps: tuple[int, ...] = (16, 32, 64)
    n: int = 1000
    rounds: int = 200
    seed: int = 0
    runs: str = "runs/study"
    out: str = "bench/results/study-digits"


STUDIES: dict[str, StudyConfig] = {
    "full": StudyConfig(),
    # the grid cut to fit a loaded 2-core CPU: one T and fewer w, fewer samples per cell
    "reduced": StudyConfig(w=(0.0, 0.1, 0.3, 1.0, 4.0), steps=(32,), n=1000),
}


def train_models(study: StudyConfig, log=print) -> list[str]:
    """One run per p_uncond under `runs/` (an existing finished run is reused); their ckpt.pt."""
    from cfgengine.train import TrainConfig, train

    paths = []
    for p in study.p_uncond:
        out = Path(study.runs) / f"{study.data}-{study.preset}-p{p:g}"
        if not (out / "model.safetensors").exists():
            start = time.perf_counter()
            train(TrainConfig(data=study.data, preset=study.preset, steps=study.train_steps,
                              batch_size=study.batch_size, p_uncond=p, seed=study.seed,
                              out=str(out), ckpt_every=study.train_steps,
                              sample_every=study.train_steps))
            log(f"trained p_uncond={p:g} in {time.perf_counter() - start:.0f} s -> {out}")
        paths.append(str(out / "ckpt.pt"))
    return paths


def eval_config(study: StudyConfig, ckpts: list[str]) -> EvalConfig:
    return EvalConfig(tuple(ckpts), study.w, study.steps, study.n, study.seed, study.out,
                      rounds=study.rounds)


def estimate(study: StudyConfig) -> float:
    """Predicted seconds for the whole study, from timing a few training steps and one small
    sampling pass of the same preset on this machine (metrics with 200-round bootstraps: ~4 s a
    cell)."""
    from cfgengine.data import load_dataset
    from cfgengine.sampler import sample
    from cfgengine.train import TrainConfig, new_state, train_step

    dataset = load_dataset(study.data)
    config = TrainConfig(data=study.data, preset=study.preset, batch_size=study.batch_size)
    state, device = new_state(config, dataset, torch.device("cpu")), torch.device("cpu")
    train_step(state, dataset, config, device)  # warm-up
    start = time.perf_counter()
    for _ in range(10):
        train_step(state, dataset, config, device)
    per_step = (time.perf_counter() - start) / 10
    labels = torch.arange(1000) % dataset.num_classes
    start = time.perf_counter()
    sample(state.ema, labels, w=torch.full((1000,), 0.5), steps=4, batch_size=1000)
    per_row_step = (time.perf_counter() - start) / 4000
    cells = len(study.p_uncond) * len(study.w) * len(study.steps)
    rows = len(study.p_uncond) * len(study.w) * study.n * sum(study.steps)
    parts = {"train": len(study.p_uncond) * study.train_steps * per_step,
             "sample": rows * per_row_step, "metrics": 4.0 * cells}
    print(", ".join(f"{k} {v / 60:.1f} min" for k, v in parts.items()))
    return sum(parts.values())


# ---------------------------------------------------------------------------------------------
# The paper's four claims, judged on the cells


def _cell(cells, model, steps, w) -> dict:
    return next(c for c in cells if c["model"] == model and c["steps"] == steps and c["w"] == w)


def _iv(cell: dict, metric: str) -> Interval:
    return Interval(**cell[metric])


def _best_w(cells, model, steps) -> float:
    own = [c for c in cells if c["model"] == model and c["steps"] == steps]
    return min(own, key=lambda c: c["fid"]["value"])["w"]


def claim_best_fid_at_small_w(cells, models, steps, ws) -> dict:
    """(1) the best FID at a small w (0.1–0.3) beating w = 0, FID worsening beyond it."""
    facts, verdicts = [], []
    for m in models:
        best = _best_w(cells, m, steps)
        fid = {w: _iv(_cell(cells, m, steps, w), "fid") for w in ws}
        after = [w for w in ws if w > best]
        rises = [compare(fid[b], fid[a]) for a, b in zip([best] + after, after)]
        small = min((fid[w] for w in ws if 0.1 <= w <= 0.3), key=lambda iv: iv.value, default=None)
        if small is None or 0.0 not in fid:
            verdicts.append("inconclusive")
            facts.append(f"{m}: the w grid lacks 0 or a w in 0.1-0.3")
            continue
        facts.append(f"{m}: best w = {best:g} (FID {fid[best].value:.3g}); best small w vs w=0: "
                     f"{compare(small, fid[0.0])}; each next w above the best: {', '.join(rises)}")
        verdicts.append(_small_w_verdict(fid[best], small, fid[0.0], rises))
    return _verdict("1: best FID at small w (0.1-0.3), worse beyond", verdicts, facts)


def _small_w_verdict(best: Interval, small: Interval, zero: Interval, rises: list[str]) -> str:
    """holds: a small w is best, distinguishably below w = 0, and FID never falls again and rises
    somewhere beyond it; fails: another w is distinguishably better than every small w, or FID
    falls again beyond the best; else inconclusive."""
    if "lower" in rises or compare(best, small) == "lower":
        return "fails"
    if best is small and compare(small, zero) == "lower" and "higher" in rises:
        return "holds"
    return "inconclusive"


def claim_is_rises(cells, models, steps, ws) -> dict:
    """(2) IS rising monotonically with w up to 4."""
    facts, verdicts = [], []
    for m in models:
        score = [_iv(_cell(cells, m, steps, w), "inception_score") for w in ws]
        steps_up = [compare(b, a) for a, b in zip(score, score[1:])]
        facts.append(f"{m}: IS at each next w: {', '.join(steps_up)}")
        verdicts.append("fails" if "lower" in steps_up else
                        "holds" if all(s == "higher" for s in steps_up) else "inconclusive")
    return _verdict("2: IS rises monotonically with w", verdicts, facts)


def claim_small_p_uncond(cells, models, p_of, steps) -> dict:
    """(3) p_uncond 0.1/0.2 beating 0.5 at the best FID; 0.5 more diverse (recall) at large w."""
    best = {m: _iv(_cell(cells, m, steps, _best_w(cells, m, steps)), "fid") for m in models}
    small = [m for m in models if p_of[m] in (0.1, 0.2)]
    half = [m for m in models if p_of[m] == 0.5]
    if not small or not half:
        return _verdict("3: p_uncond 0.1/0.2 beats 0.5 at best FID", ["inconclusive"],
                        ["needs models with p_uncond 0.1 or 0.2 and 0.5"])
    winner = min(small, key=lambda m: best[m].value)
    outcome = compare(best[winner], best[half[0]])
    top_w = max(c["w"] for c in cells)
    recall = compare(_iv(_cell(cells, half[0], steps, top_w), "recall"),
                     _iv(_cell(cells, winner, steps, top_w), "recall"))
    facts = [f"best FID {winner} {best[winner].value:.3g} vs {half[0]} {best[half[0]].value:.3g}: "
             f"{outcome}", f"recall at w={top_w:g}, {half[0]} vs {winner}: {recall}"]
    verdict = {"lower": "holds", "higher": "fails"}.get(outcome, "inconclusive")
    return _verdict("3: p_uncond 0.1/0.2 beats 0.5 at best FID", [verdict], facts)


def claim_more_steps(cells, models, all_steps) -> dict:
    """(4) more sampling steps, better samples (FID at each model's best w)."""
    facts, verdicts = [], []
    for m in models:
        best = _best_w(cells, m, max(all_steps))
        ivs = [_iv(_cell(cells, m, t, best), "fid") for t in sorted(all_steps)]
        steps_up = [compare(b, a) for a, b in zip(ivs, ivs[1:])]
        trend = " -> ".join(f"T={t} {iv.value:.3g}" for t, iv in zip(sorted(all_steps), ivs))
        facts.append(f"{m} at w={best:g}: FID {trend} ({', '.join(steps_up) or 'one T only'})")
        verdicts.append("fails" if "higher" in steps_up else
                        "holds" if steps_up and all(s == "lower" for s in steps_up) else "inconclusive")
    return _verdict("4: more steps give better FID", verdicts, facts)


def _verdict(claim: str, verdicts: list[str], facts: list[str]) -> dict:
    overall = verdicts[0] if len(set(verdicts)) == 1 else "mixed"
    return {"claim": claim, "verdict": overall, "per_model": verdicts, "evidence": facts}


def judge_claims(results: dict) -> list[dict]:
    """The four claims at the largest T (claim 4 across T)."""
    cells = results["cells"]
    models = list(dict.fromkeys(c["model"] for c in cells))
    p_of = {c["model"]: c["p_uncond"] for c in cells}
    ws, all_steps = sorted({c["w"] for c in cells}), sorted({c["steps"] for c in cells})
    top = max(all_steps)
    return [claim_best_fid_at_small_w(cells, models, top, ws),
            claim_is_rises(cells, models, top, ws),
            claim_small_p_uncond(cells, models, p_of, top),
            claim_more_steps(cells, models, all_steps)]


def claims_markdown(claims: list[dict]) -> str:
    lines = ["\n## The paper's claims (95% bootstrap intervals; overlap = inconclusive)\n"]
    for c in claims:
        lines.append(f"- **Claim {c['claim']}: {c['verdict']}**")
        lines += [f"  - {fact}" for fact in c["evidence"]]
    return "\n".join(lines) + "\n"


def run_study(study: StudyConfig, log=print) -> dict:
    """Train, evaluate, judge; results.json (with `study` and `claims`), results.md and plots."""
    start = time.perf_counter()
    results = run_eval(eval_config(study, train_models(study, log)), log)
    results["study"] = {**json.loads(json.dumps(study.__dict__)),
                        "seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
                        "device": f"CPU {platform.machine()}, {os.cpu_count()} cores"}
    results["claims"] = judge_claims(results)
    write_report(results, Path(study.out), claims_markdown(results["claims"]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfgengine.bench.studies.fid_w",
                                     description=__doc__)
    parser.add_argument("name", choices=STUDIES, help="full: the issue's grid; reduced: one T")
    parser.add_argument("--estimate", action="store_true", help="print the predicted cost only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and BLAS CPU threads (1 is fastest on a shared, loaded machine)")
    parser.add_argument("--out", default=None, help="results folder (default: the study's)")
    args = parser.parse_args(argv)
    with _thread_limits(args.threads):
        try:
            return _main(args)
        except ValueError as err:  # e.g. the digits data without scikit-learn: name the extra
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2


def _thread_limits(threads: int):
    """Cap torch's and the BLAS pools' threads. On a loaded machine a 2-thread OpenBLAS spins
    waiting for a core: the bootstrap's 128×128 eigendecompositions ran ~30× slower with it."""
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def _main(args) -> int:
    study = STUDIES[args.name] if args.out is None else replace(STUDIES[args.name], out=args.out)
    if args.estimate:
        print(f"{args.name}: about {estimate(study) / 60:.1f} min on this machine")
        return 0
    Path(study.out).mkdir(parents=True, exist_ok=True)
    for c in run_study(study)["claims"]:
        print(f"claim {c['claim']}: {c['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
