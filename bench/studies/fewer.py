"""The study of quality per second with fewer network rows per guided image: the doubled batch
(plain CFG, 2 rows per guided step), CFG(refresh=k) (2 rows on every k-th step, 1 between) and a
guidance-distilled student (1 row per step), each at several w and step counts — one command.

    python -m cfgengine.bench.studies.fewer quick                 # minutes: the pipeline only
    python -m cfgengine.bench.studies.fewer shapes [--student CKPT]   # ~40 min on one CPU thread
    python -m cfgengine.bench.studies.fewer digits                # trains and distills if missing

Every arm is sampled and timed in the same process, one after the other, at the study's batch
size (images/s: samples over the time of `cfgengine.sample`, the metrics excluded: wall time,
and the process's CPU time, which is what the ratios use — one thread, so on a quiet machine the
two agree, and on a shared one CPU time is not inflated by other processes' turns), and
scored with `cfgengine eval`'s metrics (classifier features, class-stratified bootstrap intervals).
A method "matches" the doubled batch at (w, T) when its FID interval overlaps the doubled batch's;
its speed is the ratio of its images/s to the doubled batch's at the same (w, T). The result file
also states what the intervals resolve: the typical FID interval width, and whether the study
separates T_min from T_max steps and w = 0 from the smallest w > 0 (disjoint intervals).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cfgengine.bench.studies import nfe
from cfgengine.metrics import Interval, compare


@dataclass(frozen=True)
class FewerStudyConfig:
    """One dataset's study: the teacher (as the NFE study loads it), the student, the axes."""

    data: str
    model: str  # "default", "train" or "tiny-random" (bench/studies/nfe.py's load_model)
    n: int  # class-balanced samples per (arm, w) cell
    # a guidance-distilled model for cfgengine.load; DISTILL: distilled from the teacher here (once,
    # cached next to it); None: left out
    student: str | None = None
    w: tuple[float, ...] = (0.0, 0.3, 1.0, 2.0, 4.0)
    steps: tuple[int, ...] = (8, 16, 64)
    refresh: tuple[int, ...] = (2, 3, 4)
    sampler: str = "ancestral"
    batch_size: int = 64  # B ≥ 8: the regime where the net, not the step, is the cost
    rounds: int = 200
    seed: int = 0
    out: str = "bench/results/fewer-study"
    notes: tuple[str, ...] = field(default=())


STUDIES: dict[str, FewerStudyConfig] = {
    "shapes": FewerStudyConfig(data="shapes", model="default", n=1000,
                               student="default-distilled", steps=(4, 8, 16)),
    # the first full run: more T, half the samples (intervals ~1.4× wider)
    "shapes-n500": FewerStudyConfig(data="shapes", model="default", n=500,
                                    student="default-distilled", steps=(8, 16, 32),
                                    out="bench/results/fewer-study-n500"),
    "digits": FewerStudyConfig(data="digits", model="train", n=1000, student="distill",
                               steps=(8, 16, 32)),
    # what a loaded 2-core CPU affords (~10 min): the full shapes study is hours
    "shapes-partial": FewerStudyConfig(data="shapes", model="default", n=200,
                                       student="default-distilled", w=(0.0, 0.3, 1.0, 2.0),
                                       steps=(4, 16), out="bench/results/fewer-study-partial",
                                       notes=("partial: 200 samples per cell, w ≤ 2, T ∈ {4, 16}"
                                              " — sized for a 2-core CPU shared with other jobs",)),
    "quick": FewerStudyConfig(data="digits", model="tiny-random", n=24, w=(0.0, 1.0),
                              steps=(4,), refresh=(2,), batch_size=16, rounds=20,
                              out="fewer-study-quick"),
}


@dataclass(frozen=True)
class Method:
    """One way of sampling a guided image: the teacher under a rule, or the student."""

    name: str
    refresh: int = 1
    student: bool = False

    def rule(self):
        from cfgengine import CFG

        return CFG(refresh=self.refresh)


def methods(study: FewerStudyConfig, has_student: bool) -> list[Method]:
    found = [Method("doubled")] + [Method(f"refresh-{k}", refresh=k) for k in study.refresh]
    return found + ([Method("student", student=True)] if has_student else [])


def rows_per_sample(method: Method, steps: int) -> int:
    """Rows the network forwards per sample (w ≠ 0): 2 per refresh step, else 1."""
    if method.student:
        return steps
    return steps + len(range(0, steps, method.refresh))


DISTILL = "distill"


DISTILL_STEPS = 8000


def distilled_student(ckpt: str, log=print) -> str:
    """The guidance-distilled student of the teacher at `ckpt` (a training run's ckpt.pt), made
    now unless a finished one is already next to the run, in a folder named by its step count: the
    shipped student's settings (scripts/distill_default.sh) at DISTILL_STEPS — the tiny digits
    teacher is cheap (~20 min on a CPU thread), and at 2000 its student was still outside the
    teacher's intervals at most w (bench/results/fewer-study-student2000)."""
    from cfgengine.distill import DistillConfig, distill

    if not Path(ckpt).is_file():
        raise ValueError(f"--student {DISTILL} distills a trained teacher checkpoint; the "
                         f"teacher here is {ckpt!r}: pass --student CKPT instead")
    run = Path(ckpt).parent
    out = run.with_name(f"{run.name}-distilled-{DISTILL_STEPS}") / "student.safetensors"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        distill(DistillConfig(teacher=str(ckpt), out=str(out), w_max=4.0, steps=DISTILL_STEPS,
                              batch_size=32, lr=2e-4, warmup=100, ema_decay=0.995,
                              ckpt_every=100, seed=0, device="cpu"))
        log(f"distilled {ckpt} in {time.perf_counter() - start:.0f} s -> {out}")
    return str(out)


def load_student(study: FewerStudyConfig, notes: list[str], ckpt: str | None = None):
    """The student, or None with the reason appended to `notes` (`ckpt`: the teacher's, which
    DISTILL distills)."""
    import cfgengine
    from cfgengine.model import info

    if study.student == DISTILL:
        study = replace(study, student=distilled_student(ckpt))
        notes.append(f"student: {study.student}, the guidance-distilled student of {ckpt} "
                     f"({DISTILL_STEPS} steps; distilled by the study where missing)")
    if study.student is None:
        notes.append("no student given: the distilled arm is left out")
        return None
    try:
        student = cfgengine.load(study.student)
    except (ValueError, FileNotFoundError, KeyError) as err:
        notes.append(f"student {study.student} not loadable ({err}): the distilled arm is left out")
        return None
    if not info(student).guidance_embedded:
        raise ValueError(f"{study.student} is not guidance-distilled (guidance_embedded false)")
    return student


def run_arm(engine, method: Method, steps: int, study: FewerStudyConfig, scorer) -> list[dict]:
    """Sample every w of one (method, T) in one timed pass (after an untimed warm-up batch: an
    export or session the backend makes on first use is not the method's cost), then score each
    w. `engine` is the model's `cfgengine.Sampler`."""
    from cfgengine import evaluate
    from cfgengine.figures import to_uint8_images

    labels = evaluate.cell_labels(study.n, engine.info.num_classes).repeat(len(study.w))
    w = torch.tensor(study.w).repeat_interleave(study.n)
    settings = dict(steps=steps, sampler=study.sampler, seed=study.seed,
                    guidance=None if method.student else method.rule())
    warm = slice(0, min(study.batch_size, labels.numel()))
    engine.model.warm()  # the ONNX Runtime session (export or cache) before the timed pass
    engine.sample(labels[warm], w=torch.full((warm.stop,), max(study.w)), **settings)
    start, cpu_start = time.perf_counter(), time.process_time()
    x = engine.sample(labels, w=w, batch_size=study.batch_size, **settings)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    config = replace(scorer.eval_config, w=study.w)
    rows = nfe.score(to_uint8_images(x), labels.numpy(), w.numpy(), scorer, config)
    base = dict(method=method.name, refresh=method.refresh, steps=steps,
                rows=rows_per_sample(method, steps), images_per_s=labels.numel() / seconds,
                images_per_cpu_s=labels.numel() / cpu_seconds, runtime=engine.model.runtime)
    return [dict(base, **row) for row in rows]


def _fid(cell: dict) -> Interval:
    return Interval(**cell["fid"])


def findings(cells: list[dict], study: FewerStudyConfig) -> list[dict]:
    """Per (method ≠ doubled, w > 0, T): FID against the doubled batch's and the speed ratio."""
    found = []
    for c in cells:
        if c["method"] == "doubled" or c["w"] == 0:
            continue
        ref = nfe.find_cell(cells, method="doubled", w=c["w"], steps=c["steps"])
        found.append(dict(method=c["method"], w=c["w"], steps=c["steps"],
                          fid=c["fid"]["value"], fid_doubled=ref["fid"]["value"],
                          matches=_fid(c).overlaps(_fid(ref)),
                          fid_vs_doubled=compare(_fid(c), _fid(ref)),
                          speedup=c["images_per_cpu_s"] / ref["images_per_cpu_s"],
                          speedup_wall=c["images_per_s"] / ref["images_per_s"]))
    return found


def resolution(cells: list[dict], study: FewerStudyConfig) -> dict:
    """What the intervals can tell apart, from the doubled batch's own cells: the median FID
    interval width; the smallest FID difference between two of them whose intervals are disjoint
    and the largest whose intervals still overlap (differences in between may or may not
    resolve); T_min against T_max and w = 0 against the smallest w > 0."""
    doubled = [c for c in cells if c["method"] == "doubled"]
    widths = [c["fid"]["high"] - c["fid"]["low"] for c in doubled]
    pairs = [(abs(a["fid"]["value"] - b["fid"]["value"]), _fid(a).overlaps(_fid(b)), a, b)
             for i, a in enumerate(doubled) for b in doubled[i + 1:]]
    resolved = min((p for p in pairs if not p[1]), key=lambda p: p[0], default=None)
    unresolved = max((p for p in pairs if p[1]), key=lambda p: p[0], default=None)
    lo, hi = min(study.steps), max(study.steps)
    small = min((w for w in study.w if w > 0), default=None)
    w_ref = small if small is not None else study.w[0]
    steps_pair = [nfe.find_cell(doubled, steps=t, w=w_ref) for t in (lo, hi)]
    out = dict(median_fid_interval_width=float(np.median(widths)),
               smallest_resolved=_pair(resolved), largest_unresolved=_pair(unresolved),
               steps_separated=f"T={lo} vs T={hi} at w={w_ref:g}: "
               f"{compare(_fid(steps_pair[0]), _fid(steps_pair[1]))}")
    if small is not None and 0.0 in study.w:
        pair = [nfe.find_cell(doubled, steps=hi, w=w) for w in (0.0, small)]
        out["w_separated"] = (f"w=0 vs w={small:g} at T={hi}: "
                              f"{compare(_fid(pair[0]), _fid(pair[1]))}")
    return out


def _pair(found) -> str | None:
    """'ΔFID: (w, T) FID vs (w, T) FID' of a (difference, overlaps, cell, cell) pair."""
    if found is None:
        return None
    diff, _, a, b = found
    return (f"{diff:.3g}: w={a['w']:g} T={a['steps']} ({a['fid']['value']:.3g}) vs "
            f"w={b['w']:g} T={b['steps']} ({b['fid']['value']:.3g})")


def pareto(cells: list[dict], w: float) -> list[dict]:
    """The cells at `w` that no other cell beats on both FID (lower) and images/s (higher)."""
    at_w = [c for c in cells if c["w"] == w]
    return sorted((c for c in at_w if not any(
        o["fid"]["value"] <= c["fid"]["value"] and o["images_per_cpu_s"] >= c["images_per_cpu_s"]
        and (o["fid"]["value"], o["images_per_cpu_s"])
        != (c["fid"]["value"], c["images_per_cpu_s"]) for o in at_w)),
        key=lambda c: c["images_per_cpu_s"])


def recommend(cells: list[dict], study: FewerStudyConfig) -> list[dict]:
    """Per w > 0: the fastest (method, T) whose FID interval overlaps the best FID's interval —
    what the study can honestly call "as good as the best, for less"."""
    out = []
    for w in (w for w in study.w if w > 0):
        at_w = [c for c in cells if c["w"] == w]
        best = min(at_w, key=lambda c: c["fid"]["value"])
        pick = max((c for c in at_w if _fid(c).overlaps(_fid(best))),
                   key=lambda c: c["images_per_cpu_s"])
        out.append(dict(w=w, method=pick["method"], steps=pick["steps"],
                        fid=pick["fid"]["value"], best=f"{best['method']} T={best['steps']}",
                        best_fid=best["fid"]["value"],
                        speedup_vs_best=pick["images_per_cpu_s"] / best["images_per_cpu_s"]))
    return out


def plot(result: dict, path: Path) -> None:
    """FID (95 % interval) against images per CPU-second, one panel per w > 0, one marker per
    method, T written by each point; the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, cells = result["study"], result["cells"]
    ws = [w for w in s["w"] if w > 0]
    names = list(dict.fromkeys(c["method"] for c in cells))
    fig, axes = plt.subplots(1, len(ws), figsize=(4.2 * len(ws), 3.8), squeeze=False)
    for ax, w in zip(axes[0], ws):
        for c in (c for c in cells if c["w"] == w):
            f, color = c["fid"], f"C{names.index(c['method']) % 10}"
            ax.errorbar(c["images_per_cpu_s"], f["value"], fmt="o", color=color,
                        yerr=[[f["value"] - f["low"]], [f["high"] - f["value"]]], ms=4)
            ax.annotate(str(c["steps"]), (c["images_per_cpu_s"], f["value"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        front = pareto(cells, w)
        ax.plot([c["images_per_cpu_s"] for c in front], [c["fid"]["value"] for c in front],
                color="grey", lw=0.8, zorder=0)
        ax.set(xscale="log", yscale="log", xlabel="images per CPU-second", ylabel="FID",
               title=f"{s['data']}, w = {w:g}")
    for i, name in enumerate(names):
        axes[0][0].plot([], [], "o", color=f"C{i % 10}", label=name)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(study: FewerStudyConfig, log=print) -> dict:
    """Sample, time and score every (method, T); write results.json and results.md."""
    start, load_start = time.perf_counter(), os.getloadavg()
    teacher, ckpt = nfe.load_model(study)
    scorer = nfe.make_scorer(teacher, study, ckpt)
    notes = list(study.notes)
    student = load_student(study, notes, ckpt)
    from cfgengine import Sampler

    engines = {False: Sampler(teacher), True: None if student is None else Sampler(student)}
    cells = []
    for method in methods(study, student is not None):
        for steps in study.steps:
            cells += run_arm(engines[method.student], method, steps, study, scorer)
            log(f"{method.name} T={steps}: {cells[-1]['images_per_s']:.1f} images/s")
    result = dict(study=json.loads(json.dumps(dataclasses.asdict(study))), ckpt=ckpt,
                  notes=notes, cells=cells, findings=findings(cells, study),
                  resolution=resolution(cells, study),
                  recommendation=recommend(cells, study),
                  load_average=dict(start=load_start, end=os.getloadavg()),
                  device=f"CPU {platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch thread(s)",
                  seconds=time.perf_counter() - start, torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"))
    return write(result, study)


def markdown(result: dict) -> str:
    s = result["study"]
    lines = [f"# Quality per second, fewer rows per guided image: {s['data']}\n",
             f"{s['n']} samples per cell, batch {s['batch_size']}, {s['sampler']}, seed "
             f"{s['seed']}; teacher {result['ckpt']}; {result['seconds'] / 60:.1f} min on "
             f"{result['device']}.", *[f"Note: {n}." for n in result["notes"]], "",
             "What the intervals resolve (the doubled batch's own cells):", "",
             *[f"- {k.replace('_', ' ')}: {v:.3g}" if isinstance(v, float)
               else f"- {k.replace('_', ' ')}: {v}" for k, v in result["resolution"].items()], "",
             f"Load average (1, 5, 15 min) at start {_load(result, 'start')}, at end "
             f"{_load(result, 'end')}; speed ratios are of images per CPU-second (wall in the "
             "JSON).", "",
             "| method | w | T | FID (doubled) | matches | speed × doubled |",
             "|---|---|---|---|---|---|"]
    for f in result["findings"]:
        lines.append(f"| {f['method']} | {f['w']:g} | {f['steps']} | {f['fid']:.3g} "
                     f"({f['fid_doubled']:.3g}) | {f['matches']} | {f['speedup']:.2f} |")
    lines += ["", "Recommendation per w (the fastest cell whose FID interval overlaps the best "
              "cell's):", "", "| w | method | T | FID | best | best FID | speed × best |",
              "|---|---|---|---|---|---|---|"]
    for r in result["recommendation"]:
        lines.append(f"| {r['w']:g} | {r['method']} | {r['steps']} | {r['fid']:.3g} | "
                     f"{r['best']} | {r['best_fid']:.3g} | {r['speedup_vs_best']:.2f} |")
    return "\n".join(lines) + "\n"


def _load(result: dict, when: str) -> str:
    return ", ".join(f"{x:.1f}" for x in result["load_average"][when])


def write(result: dict, study: FewerStudyConfig) -> dict:
    """results.json and results.md in OUT/DATA, together or not at all."""
    from cfgengine.atomic import atomic_paths

    out = Path(study.out) / study.data
    out.mkdir(parents=True, exist_ok=True)
    with atomic_paths(out / "results.json", out / "results.md") as paths:
        Path(paths[0]).write_text(json.dumps(result, indent=1) + "\n")
        Path(paths[1]).write_text(markdown(result))
    if any(w > 0 for w in study.w):  # the measurements are safe on disk before plotting
        with atomic_paths(out / "pareto.png") as (path,):
            plot(result, Path(path))
    return result


def report(path: str | Path) -> dict:
    """Findings, resolution, recommendation, the tables and the plot of a stored results.json,
    re-derived from its cells (nothing is sampled or timed again), written beside it."""
    result = json.loads(Path(path).read_text())
    study = replace(FewerStudyConfig(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in result["study"].items()}),
                    out=str(Path(path).parent.parent))
    result.update(findings=findings(result["cells"], study),
                  resolution=resolution(result["cells"], study),
                  recommendation=recommend(result["cells"], study))
    return write(result, study)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfgengine.bench.studies.fewer",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=[*STUDIES, "report"],
                        help="shapes, shapes-partial, digits or quick; report re-derives the "
                        "tables and plot of --out's results.json from its stored cells")
    parser.add_argument("--student", default=None, help="a guidance-distilled model (default: "
                        "the study's, e.g. default-distilled for shapes)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--out", default=None, help="results folder (default: the study's)")
    args = parser.parse_args(argv)
    if args.name == "report":
        if args.out is None:
            parser.error("report needs --out PATH/results.json")
        report(args.out)
        return 0
    from cfgengine.bench.studies.fid_w import _thread_limits

    study = STUDIES[args.name]
    study = replace(study, student=args.student or study.student, out=args.out or study.out)
    with _thread_limits(args.threads):
        try:
            result = run_study(study)
        except ValueError as err:  # a bad --student, a model that cannot load: one line
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
    for f in result["findings"]:
        print(f"{f['method']} w={f['w']:g} T={f['steps']}: matches={f['matches']} "
              f"speed {f['speedup']:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
