"""Quality of the network precisions (issue 27): a model sampled at fp32, bf16 and int8 with the
same seeds, scored with FID / IS / precision / recall and their 95 % bootstrap intervals
(cfgengine.evaluate.score_cell), next to KNOWN degradations — the fp32 weights with Gaussian noise
of a stated size relative to each tensor's RMS — that show which FID difference the estimate
resolves at this n: "inside fp32's interval" means something only if a known-worse model falls
outside it. On a CPU without native bf16, real bf16 runs emulated by oneDNN at a few % of fp32's
speed (sampled only with --force bf16); the arm "bf16-emulated" computes the same bf16 roundings at
fp32 speed (EmulatedBf16).

    python -m cfgengine.bench.studies.precision                # shapes (the default model)
    python -m cfgengine.bench.studies.precision --data digits  # the NFE study's digits teacher
    python -m cfgengine.bench.studies.precision --n 200 --precisions fp32,int8

Writes bench/results/precision-{shapes,digits}.json and .md. A precision whose interval does not
overlap fp32's must not be a default anywhere (fp32 is the default everywhere today).
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
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

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


DATA = ("shapes", "digits")


@dataclass(frozen=True)
class StudyConfig:
    data: str = "shapes"  # shapes: the model `model` (the shipped default); digits: the NFE
    # study's digits teacher (runs/study/digits-tiny-p0.2, trained first when missing)
    model: str = "default"
    precisions: tuple[str, ...] = ("fp32", "bf16", "bf16-emulated", "int8")
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


BF16_OPS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
            F.conv_transpose3d, F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm,
            torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__)  # autocast's bf16 list
EMULATED = "bf16-emulated"


def to_bf16(x):
    """A floating tensor rounded to bf16 (round to nearest even) and held in fp32; else `x`."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(torch.bfloat16).float()
    return x


class EmulatedBf16(TorchFunctionMode):
    """What torch.autocast(cpu, bf16) on oneDNN's bf16 kernels computes, at fp32 speed on a CPU
    without bf16 dot products: every conv/linear/matmul takes bf16-rounded inputs, weights and
    bias, accumulates in fp32 (a product of two bf16 values is exact in fp32) and returns its
    output as a bf16 tensor — so the ops after it see bf16, as under autocast. Attention follows
    the kernel torch picks (see _attention)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        if func not in BF16_OPS:
            return func(*args, **kwargs)
        args, kwargs = tree_map(to_bf16, (args, kwargs))
        return func(*args, **kwargs).to(torch.bfloat16)


def _attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """bf16 scaled dot-product attention as torch's CPU kernels compute it (no mask or dropout:
    what the UNet calls). The flash kernel (4-d q, k, v of unit last stride) forms q·kᵀ from bf16
    operands in fp32 and rounds the unnormalised softmax exp(s − max) to bf16 for its product
    with v, dividing by the fp32 row sum; otherwise the math kernel runs in fp32 on the bf16
    inputs (torch's default: no bf16 reductions in math SDPA). Either output is rounded to bf16.
    The mode is off inside __torch_function__: these are plain fp32 ops."""
    if attn_mask is not None or dropout_p or is_causal:
        raise ValueError("the bf16 emulation covers unmasked attention without dropout only")
    flash = all(t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v))
    q, k, v = to_bf16(q), to_bf16(k), to_bf16(v)
    if not flash:
        return F.scaled_dot_product_attention(q, k, v, scale=scale).to(torch.bfloat16)
    s = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return ((to_bf16(p) @ v) / p.sum(-1, keepdim=True)).to(torch.bfloat16)


class Bf16Emulated(nn.Module):
    """`net` (same ModelInfo) whose forward runs under EmulatedBf16; ε comes back in fp32,
    as the Sampler's autocast hands it to the fp32 step."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.info = net, model_info(net)

    def forward(self, *args) -> torch.Tensor:
        with EmulatedBf16():
            return self.net(*args).float()


def variants(model, study: StudyConfig) -> list[tuple[str, torch.nn.Module, str]]:
    """(name, model, precision) of every sampled variant: the precisions, then the noisy fp32."""
    runs = [(p, Bf16Emulated(model), "fp32") if p == EMULATED else (p, model, p)
            for p in study.precisions]
    return runs + [(f"fp32+noise {r:g}", noisy(model, r, study.seed), "fp32")
                   for r in study.noise]


def sample(model, precision: str, labels: torch.Tensor, study: StudyConfig) -> np.ndarray:
    """uint8 NHWC samples of `labels` at `precision`, the study's seed, w and T."""
    # bf16 needs autocast, which the torch backend applies, and the emulation its torch function
    # mode (an exported graph would drop it); int8 its ONNX Runtime graph (auto)
    backend = "torch" if precision == "bf16" or isinstance(model, Bf16Emulated) else "auto"
    engine = Sampler(model, backend=backend, precision=precision)
    x = engine.sample(labels, w=study.w, steps=study.steps, seed=study.seed)
    return to_uint8_images(x)


def run(study: StudyConfig, log=print) -> dict:
    """Sample and score every variant; the result document (also written as JSON + markdown)."""
    torch.manual_seed(study.seed)
    model, ckpt = study_model(study)
    dataset = model_info(model).dataset
    extractor, key = load_extractor(None, dataset)
    ref = metrics.reference(dataset, extractor, key, Path.home() / ".cache" / "cfgengine")
    radii = metrics.knn_radii(ref.features, 3)
    scoring = EvalConfig(ckpts=(ckpt,), n=study.n, rounds=study.rounds, seed=study.seed)
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
        emulated = "bf16 emulated in fp32" if name == EMULATED else precision
        rows.append(dict(variant=name, network_precision=emulated, sample_seconds=seconds,
                         **{m: scores[m] for m in SCORED}))
        log(f"{name}: {study.n} samples in {seconds:.0f} s, FID {_fmt(scores['fid'])}")
    return dict(timing.environment("cpu", "wall clock"), study=dataclasses.asdict(study),
                dataset=dataset, feature_key=key, reference_n=len(ref.features),
                variants=rows, skipped=skipped, verdicts=verdicts(rows))


def study_model(study: StudyConfig) -> tuple[nn.Module, str]:
    """(the model in eval mode, its checkpoint or registry name): `study.model` for shapes, the
    digits teacher of the NFE study loaded as that study loads it (trained when missing)."""
    if study.data not in DATA:
        raise ValueError(f"--data must be one of {', '.join(DATA)}, got {study.data!r}")
    if study.data == "shapes":
        return load(study.model).eval(), study.model
    if study.model != StudyConfig.model:
        raise ValueError("--model picks the shapes model; --data digits samples the NFE "
                         "study's digits teacher")
    from cfgengine.bench.studies import nfe

    model, ckpt = nfe.load_model(nfe.STUDIES["digits"])
    return model.eval(), ckpt


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
    parser.add_argument("--data", choices=DATA, default=default.data)
    parser.add_argument("--model", default=default.model, help="the shapes model (registry "
                        "name or file)")
    parser.add_argument("--precisions", default=",".join(default.precisions))
    parser.add_argument("--noise", default=",".join(map(str, default.noise)))
    for field in ("n", "steps", "seed", "rounds"):
        parser.add_argument(f"--{field}", type=int, default=getattr(default, field))
    parser.add_argument("--w", type=float, default=default.w)
    parser.add_argument("--out", default=default.out)
    parser.add_argument("--force", default="", help="precisions to sample even where emulated "
                        "(bf16 without native bf16 ran 14-55x slower than fp32 here)")
    args = parser.parse_args(argv)
    return StudyConfig(data=args.data, model=args.model,
                       precisions=tuple(args.precisions.split(",")),
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
