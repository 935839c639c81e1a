"""Quality of the network precisions (issue 27): the default model sampled at fp32, bf16 and int8
with the same seeds, scored with FID / IS / precision / recall and their 95 % bootstrap intervals
(cfgengine.evaluate.score_cell), next to KNOWN degradations — the fp32 weights with Gaussian noise
of a stated size relative to each tensor's RMS — that show which FID difference the estimate
resolves at this n: "inside fp32's interval" means something only if a known-worse model falls
outside it.

    python -m cfgengine.bench.studies.precision                # shapes, n = 1000, T = 16
    python -m cfgengine.bench.studies.precision --n 200 --precisions fp32,int8

Writes bench/results/precision-shapes.json and .md. A precision whose interval does not overlap
fp32's must not be a default anywhere (fp32 is the default everywhere today).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cfgengine import cpu, metrics
from cfgengine.atomic import atomic_paths
from cfgengine.bench import timing
from cfgengine.data import from_uint8
from cfgengine.evaluate import EvalConfig, cell_labels, load_extractor, score_cell
from cfgengine.figures import to_uint8_images
from cfgengine.model import info as model_info
from cfgengine.registry import load
from cfgengine.sampler import Sampler

SCORED = ("fid", "inception_score", "precision", "recall")


@dataclass(frozen=True)
class StudyConfig:
    model: str = "default"
    precisions: tuple[str, ...] = ("fp32", "bf16", "int8")
    noise: tuple[float, ...] = (0.03, 0.05, 0.1)  # relative std of the added weight noise (fp32)
    n: int = 1000  # samples per variant, class-balanced: 5-13 minutes here at load 3-10
    steps: int = 16
    w: float = 0.3
    seed: int = 0
    rounds: int = 200  # bootstrap resamples
    force: tuple[str, ...] = ()  # precisions sampled even where this CPU only emulates them
    out: str = "bench/results"


def noisy(model: torch.nn.Module, relative: float, seed: int) -> torch.nn.Module:
    """A copy of `model` whose every floating weight tensor gets N(0, (relative·RMS)²) noise."""
    copied = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copied.parameters():
            if p.is_floating_point() and p.numel() > 1:
                rms = p.pow(2).mean().sqrt()
                p.add_(relative * rms * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return copied


def variants(model, study: StudyConfig) -> list[tuple[str, torch.nn.Module, str]]:
    """(name, model, precision) of every sampled variant: the precisions, then the noisy fp32."""
    runs = [(p, model, p) for p in study.precisions]
    return runs + [(f"fp32+noise {r:g}", noisy(model, r, study.seed), "fp32")
                   for r in study.noise]


def sample(model, precision: str, labels: torch.Tensor, study: StudyConfig) -> np.ndarray:
    """uint8 NHWC samples of `labels` at `precision`, the study's seed, w and T."""
    # bf16 needs autocast, which the torch backend applies; int8 its ONNX Runtime graph (auto)
    backend = "torch" if precision == "bf16" else "auto"
    engine = Sampler(model, backend=backend, precision=precision)
    x = engine.sample(labels, w=study.w, steps=study.steps, seed=study.seed)
    return to_uint8_images(x)


def run(study: StudyConfig, log=print) -> dict:
    """Sample and score every variant; the result document (also written as JSON + markdown)."""
    torch.manual_seed(study.seed)
    model = load(study.model).eval()
    dataset = model_info(model).dataset
    extractor, key = load_extractor(None, dataset)
    ref = metrics.reference(dataset, extractor, key, Path.home() / ".cache" / "cfgengine")
    radii = metrics.knn_radii(ref.features, 3)
    scoring = EvalConfig(ckpts=(study.model,), n=study.n, rounds=study.rounds, seed=study.seed)
    labels = cell_labels(study.n, model_info(model).num_classes)
    rows, skipped = [], []
    for name, net, precision in variants(model, study):
        why = cpu.unsupported(precision) if precision != "fp32" else None
        if why is not None and precision not in study.force:
            skipped.append(dict(variant=name, reason=why))
            log(f"{name}: not sampled ({why})")
            continue
        start = time.perf_counter()
        images = sample(net, precision, labels, study)
        seconds = time.perf_counter() - start
        features, probs = metrics.extract(extractor, from_uint8(images))
        scores = score_cell(features, probs, labels.numpy(), ref, radii, scoring)
        rows.append(dict(variant=name, network_precision=precision, sample_seconds=seconds,
                         **{m: scores[m] for m in SCORED}))
        log(f"{name}: {study.n} samples in {seconds:.0f} s, FID {_fmt(scores['fid'])}")
    return dict(timing.environment("cpu", "wall clock"), study=dataclasses.asdict(study),
                dataset=dataset, feature_key=key, reference_n=len(ref.features),
                variants=rows, skipped=skipped, verdicts=verdicts(rows))


def verdicts(rows: list[dict]) -> dict:
    """Per variant and metric: does its interval overlap fp32's, and the FID gap to fp32. The
    resolution is the smallest FID gap of a noisy model whose interval is disjoint from fp32's."""
    base = next(r for r in rows if r["variant"] == "fp32")
    out, resolved = {}, []
    for r in rows[1:]:
        overlap = {m: metrics.Interval(**r[m]).overlaps(metrics.Interval(**base[m]))
                   for m in SCORED}
        gap = r["fid"]["value"] - base["fid"]["value"]
        out[r["variant"]] = dict(overlaps_fp32=overlap, fid_minus_fp32=gap)
        if r["variant"].startswith("fp32+noise") and not overlap["fid"]:
            resolved.append(gap)
    half = (base["fid"]["high"] - base["fid"]["low"]) / 2
    return dict(variants=out, fp32_fid_half_width=half,
                smallest_resolved_fid_gap=min(resolved, key=abs) if resolved else None)


def _fmt(interval: dict) -> str:
    return f"{interval['value']:.3g} [{interval['low']:.3g}, {interval['high']:.3g}]"


def markdown(result: dict, command: str) -> str:
    s = result["study"]
    lines = [f"# Quality of the network precisions: {result['dataset']}", "",
             f"`{command}` — {s['n']} class-balanced samples per variant, same seed "
             f"({s['seed']}), w = {s['w']}, T = {s['steps']}, ancestral; features "
             f"{result['feature_key']} ({result['reference_n']} real images); 95 % percentile "
             f"bootstrap, {s['rounds']} resamples. {result['device_name']}, torch "
             f"{result['torch']}, onnxruntime {result['onnxruntime']}, commit "
             f"`{result['git_commit'][:12]}`, {result['date']}, load {result['load_average']}.",
             "", "| variant | FID | IS | precision | recall | overlaps fp32 (FID, IS, P, R) "
             "| s to sample |", "|---|---|---|---|---|---|---|"]
    v = result["verdicts"]
    for r in result["variants"]:
        overlap = v["variants"].get(r["variant"], {}).get("overlaps_fp32")
        text = "—" if overlap is None else ", ".join("yes" if overlap[m] else "**no**"
                                                      for m in SCORED)
        lines.append(f"| {r['variant']} | " + " | ".join(_fmt(r[m]) for m in SCORED)
                     + f" | {text} | {r['sample_seconds']:.0f} |")
    lines += [f"| {r['variant']} | not sampled: {r['reason']} |" for r in result["skipped"]]
    gap = v["smallest_resolved_fid_gap"]
    lines += ["", f"fp32's FID interval half-width: {v['fp32_fid_half_width']:.3g}. Smallest FID "
              f"difference a known degradation showed outside it: "
              + ("none of the noise levels" if gap is None else f"{gap:+.3g}") + "."]
    return "\n".join(lines) + "\n"


def write(result: dict, command: str) -> list[Path]:
    out = Path(result["study"]["out"])
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"precision-{result['dataset']}.{ext}" for ext in ("json", "md")]
    with atomic_paths(*paths) as (js, md):
        Path(js).write_text(json.dumps(dict(result, command=command), indent=1) + "\n")
        Path(md).write_text(markdown(result, command))
    return paths


def parse(argv: list[str]) -> StudyConfig:
    """The StudyConfig of a command line (every flag named as its field)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = StudyConfig()
    parser.add_argument("--model", default=default.model)
    parser.add_argument("--precisions", default=",".join(default.precisions))
    parser.add_argument("--noise", default=",".join(map(str, default.noise)))
    for field in ("n", "steps", "seed", "rounds"):
        parser.add_argument(f"--{field}", type=int, default=getattr(default, field))
    parser.add_argument("--w", type=float, default=default.w)
    parser.add_argument("--out", default=default.out)
    parser.add_argument("--force", default="", help="precisions to sample even where emulated "
                        "(bf16 without native bf16 ran 14-55x slower than fp32 here)")
    args = parser.parse_args(argv)
    return StudyConfig(model=args.model, precisions=tuple(args.precisions.split(",")),
                       noise=tuple(float(x) for x in args.noise.split(",") if x), n=args.n,
                       steps=args.steps, w=args.w, seed=args.seed, rounds=args.rounds,
                       out=args.out, force=tuple(p for p in args.force.split(",") if p))


def main(argv: list[str]) -> None:
    study = parse(argv)
    command = "python -m cfgengine.bench.studies.precision " + " ".join(argv)
    result = run(study)
    paths = write(result, command.strip())
    print(markdown(result, command.strip()) + "wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
