"""`cfgengine eval`: sample every (model, T) configuration once — a per-sample w covers the whole w
sweep in one pass — write the samples as sharded .npz, and score each (model, T, w) cell with the
metrics of metrics.py, bootstrap intervals included. The FID/IS-versus-w study of Ho & Salimans
(2022, §4.2, Table 1 and Fig. 4) is this run over models trained with different p_uncond.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cfgengine import distributed, metrics
from cfgengine.atomic import atomic_path, atomic_paths
from cfgengine.figures import to_uint8_images
from cfgengine.model import info as model_info

PAPER_W = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0)
METRICS = ("fid", "inception_score", "precision", "recall", "accuracy")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: models × steps T × guidance weights w, `n` class-balanced samples per cell."""

    ckpts: tuple[str, ...]
    w: tuple[float, ...] = PAPER_W
    steps: tuple[int, ...] = (64,)
    n: int = 1000
    seed: int = 0
    out_dir: str = "eval"
    features: str | None = None  # None: the dataset's shipped classifier
    k: int = 3
    rounds: int = 200
    batch_size: int = 2000
    sampler: str = "ancestral"
    v: float = 0.3
    cache_dir: str | None = None  # None: ~/.cache/cfgengine
    trust_code: bool = False  # run .pt2 / TorchScript code files not exported on this machine
    save_samples: bool = True  # False: score without writing (or, under torchrun, gathering) images

    def __post_init__(self):
        if not self.ckpts:
            raise ValueError("eval needs at least one model (--ckpt)")
        if not self.w or not all(math.isfinite(w) for w in self.w):
            raise ValueError("--w: give finite guidance weights")
        if not self.steps or min(self.steps) < 2:
            raise ValueError(f"--steps: every T must be ≥ 2, got {list(self.steps)}")
        if self.n < max(self.k + 1, 2):
            raise ValueError(f"--per-cell/--n must be ≥ k + 1 = {self.k + 1} (k-NN manifolds), "
                             f"got {self.n}")
        if self.k < 1 or self.rounds < 2 or self.batch_size < 1:
            raise ValueError("--k ≥ 1, --bootstrap ≥ 2 and --batch ≥ 1 are required")
        if len(set(self.w)) != len(self.w) or len(set(self.steps)) != len(self.steps):
            raise ValueError("--w and --steps values must be distinct")


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate, its display name and (if its checkpoint records it) p_uncond."""

    path: str
    name: str
    p_uncond: float | None
    model: object


def load_models(paths: tuple[str, ...], trust_code: bool = False) -> list[ModelSpec]:
    """Load every model; all must be image models trained on one dataset with a known name."""
    from cfgengine.registry import load

    specs = [_spec(path, load(path, trust_code=trust_code)) for path in paths]
    datasets = {model_info(s.model).dataset for s in specs}
    if len(datasets) != 1 or "" in datasets:
        raise ValueError(f"eval compares models of one known dataset, got {sorted(datasets)}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):  # same p_uncond twice: fall back to file paths
        specs = [ModelSpec(s.path, s.path, s.p_uncond, s.model) for s in specs]
    return specs


def _spec(path: str, model) -> ModelSpec:
    p_uncond = _recorded_p_uncond(path)
    name = f"p_uncond={p_uncond:g}" if p_uncond is not None else Path(path).stem
    return ModelSpec(path, name, p_uncond, model)


def _recorded_p_uncond(path: str) -> float | None:
    """p_uncond from a training checkpoint (ckpt.pt) or a run folder's ckpt.pt beside the file."""
    from cfgengine.checkpoint import read_checkpoint

    candidates = [Path(path)] if Path(path).suffix == ".pt" else [Path(path).parent / "ckpt.pt"]
    for candidate in candidates:
        if candidate.exists():
            return float(read_checkpoint(candidate)["config"]["p_uncond"])
    return None


def check_sample_shapes(specs: list[ModelSpec], dataset: str) -> tuple[int, ...]:
    """The reference images' shape; ValueError if a model samples another shape (scoring an
    8×8 model against 16×16 real images would be meaningless)."""
    from cfgengine.data import load_dataset

    shape = tuple(load_dataset(dataset).shape)
    for spec in specs:
        own = model_info(spec.model).sample_shape
        if own != shape:
            raise ValueError(f"{spec.path}: samples of shape {own}, "
                             f"but the {dataset} reference images are {shape}")
    return shape


def probe_extractor(extractor, shape: tuple[int, ...], features: str | None) -> None:
    """ValueError (one line) unless the feature network maps 2 images of `shape` to features
    [2, F] (and probs [2, K]): a wrong network fails here, before any sampling."""
    try:
        feats, probs = extractor(torch.zeros((2, *shape)))
    except Exception as err:  # a foreign network raises whatever its first layer raises
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"--features {features}: cannot score images of shape {shape}: "
                         f"{first}") from err
    if feats.dim() != 2 or feats.shape[0] != 2 or (probs is not None and probs.shape[0] != 2):
        raise ValueError(f"--features {features}: returned features of shape "
                         f"{tuple(feats.shape)} for 2 images, expected [2, F]")


def load_extractor(features: str | None, dataset: str, trust_code: bool = False):
    """(extractor, cache key): the dataset's shipped classifier, a classifier .safetensors file, or
    a feature network file (.pt2 torch.export or TorchScript, e.g. Inception the user has)."""
    from cfgengine.classifier import classifier_path, load_classifier

    if features is None or Path(features).suffix == ".safetensors":
        path = classifier_path(dataset) if features is None else Path(features)
        net = load_classifier(dataset if features is None else features)
        return metrics.classifier_extractor(net), metrics.file_digest(path)
    if not Path(features).is_file():
        raise FileNotFoundError(f"--features {features}: no such file")
    return metrics.network_extractor(features, trust_code), metrics.file_digest(features)


def cell_labels(n: int, num_classes: int) -> torch.Tensor:
    """n class-balanced labels (counts differ by at most one)."""
    return torch.arange(n) % num_classes


def sample_configuration(spec: ModelSpec, config: EvalConfig, steps: int):
    """All w of one (model, T) in ONE sampling pass: uint8 NHWC [len(w)·n], labels, w — under
    torchrun, this rank's shard of those rows."""
    from cfgengine.sampler import Sampler

    labels = cell_labels(config.n, model_info(spec.model).num_classes).repeat(len(config.w))
    w = torch.tensor(config.w).repeat_interleave(config.n)  # (len(w)·n,)
    x = distributed.sample_shard(Sampler(spec.model), labels, w, steps=steps,
                                 sampler=config.sampler, v=config.v, seed=config.seed,
                                 batch_size=config.batch_size)  # (shard rows, C, H, W)
    rows = distributed.shard(len(labels))
    return to_uint8_images(x), labels[rows].numpy(), w[rows].numpy()


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray, w: np.ndarray) -> None:
    """The ADM-evaluator layout: arr_0 uint8 NHWC, plus labels and per-sample w."""
    with atomic_path(path, ".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, labels=labels, w=w)


def score_cell(features: np.ndarray, probs: np.ndarray | None, labels: np.ndarray,
               ref: metrics.Reference, real_radii: np.ndarray, config: EvalConfig,
               gaussian: metrics.Gaussian | None = None) -> dict:
    """Every metric of one cell with its bootstrap interval: generated samples resampled within
    their requested class; recall's per-real-image hits resampled with the generated manifold
    held fixed (its interval is conditional on that set). `gaussian`: the cell's fit from
    all-reduced moments, FID's point estimate (default: fitted to `features`)."""
    precision_hits, recall_hits = metrics.manifold_hits(ref.features, features, config.k,
                                                        real_radii)
    statistics = {
        "fid": (lambda i: metrics.frechet_distance(metrics.gaussian_fit(features[i]),
                                                   ref.gaussian), labels),
        "precision": (lambda i: precision_hits[i].mean(), labels),
        "recall": (lambda i: recall_hits[i].mean(), None),
    }
    if probs is not None:
        hits = metrics.correct(probs, labels)
        statistics["inception_score"] = (lambda i: metrics.inception_score(probs[i]), labels)
        statistics["accuracy"] = (lambda i: hits[i].mean(), labels)
    sizes = {"recall": len(recall_hits)}
    values = {} if gaussian is None else {"fid": metrics.frechet_distance(gaussian, ref.gaussian)}
    return {name: asdict(metrics.bootstrap(stat, sizes.get(name, len(labels)), strata=strata,
                                           rounds=config.rounds, seed=config.seed,
                                           value=values.get(name)))
            for name, (stat, strata) in statistics.items()}


def cell_moments(features: np.ndarray, w: np.ndarray, config: EvalConfig,
                 ref: metrics.Reference) -> np.ndarray:
    """float64 [len(config.w), 1 + F + F²]: each w cell's feature `moments` about the reference
    mean, summed over every rank (one all-reduce)."""
    center = ref.gaussian.mu
    local = np.stack([metrics.moments(features[w == np.float32(value)], center)
                      for value in config.w])
    return distributed.all_reduce_sum(local)


def score_configuration(features: np.ndarray, probs: np.ndarray | None, labels: np.ndarray,
                        w: np.ndarray, totals: np.ndarray, ref: metrics.Reference,
                        real_radii: np.ndarray, config: EvalConfig) -> list:
    """One result dict per w of a sampled configuration, from the features of the quantised
    uint8 images (as an evaluator reading the shards would see them) and `cell_moments`."""
    rows = []
    for value, total in zip(config.w, totals):
        mask = w == np.float32(value)
        cell_probs = None if probs is None else probs[mask]
        gaussian = metrics.gaussian_from_moments(total, ref.gaussian.mu)
        rows.append({"w": value, "n": int(mask.sum()),
                     **score_cell(features[mask], cell_probs, labels[mask], ref, real_radii,
                                  config, gaussian)})
    return rows


def run_eval(config: EvalConfig, log=print) -> dict:
    """Sample and score every configuration; writes shards, then results.json, results.md and the
    plots into `config.out_dir` (all atomically). Returns the results."""
    specs = load_models(config.ckpts, config.trust_code)
    dataset = specs[0].model.dataset
    shape = check_sample_shapes(specs, dataset)
    extractor, key = load_extractor(config.features, dataset, config.trust_code)
    probe_extractor(extractor, shape, config.features)
    ref = metrics.reference(dataset, extractor, key, _cache_dir(config))
    real_radii = metrics.knn_radii(ref.features, config.k)
    out = Path(config.out_dir)
    if distributed.is_main():  # only once every input has been read; rank 0 writes
        out.mkdir(parents=True, exist_ok=True)
        if config.save_samples:
            (out / "samples").mkdir(exist_ok=True)
    cells = []
    for spec in specs:
        for steps in config.steps:
            cells += _evaluate_configuration(spec, steps, config, extractor, ref, real_radii, log)
    results = {"config": asdict(config), "dataset": dataset, "feature_key": key,
               "reference_n": len(ref.features), "cells": cells}
    if distributed.is_main():
        write_report(results, out)
    return results


def _evaluate_configuration(spec: ModelSpec, steps: int, config: EvalConfig, extractor,
                            ref: metrics.Reference, real_radii: np.ndarray, log) -> list:
    from cfgengine.data import from_uint8

    start = time.perf_counter()
    images, labels, w = sample_configuration(spec, config, steps)  # this rank's shard
    seconds = time.perf_counter() - start
    features, probs = metrics.extract(extractor, from_uint8(images))
    totals = cell_moments(features, w, config, ref)
    count = len(config.w) * config.n  # rank 0 gathers what P/R and the bootstraps resample
    labels, w, features, probs = (distributed.gather_rows(rows, count)
                                  for rows in (labels, w, features, probs))
    if config.save_samples:  # the images travel (and reach the disk) only when asked for
        images = distributed.gather_rows(images, count)
    if not distributed.is_main():
        return []
    where = "not written (--no-samples)"
    if config.save_samples:
        where = Path(config.out_dir) / "samples" / f"{_slug(spec.name)}-T{steps}.npz"
        write_shard(where, images, labels, w)
    rows = score_configuration(features, probs, labels, w, totals, ref, real_radii, config)
    log(f"{spec.name} T={steps}: {count} samples in {seconds:.1f} s -> {where}")
    return [{"model": spec.name, "ckpt": spec.path, "p_uncond": spec.p_uncond, "steps": steps,
             "sample_seconds": seconds / len(config.w), **row} for row in rows]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def _cache_dir(config: EvalConfig) -> Path:
    return Path(config.cache_dir) if config.cache_dir else Path.home() / ".cache" / "cfgengine"


# ---------------------------------------------------------------------------------------------
# Report: JSON, markdown table, plots


def markdown_table(cells: list[dict]) -> str:
    """One row per cell: value [low, high] of every metric present."""
    present = [m for m in METRICS if m in cells[0]]
    header = "| model | T | w | n | " + " | ".join(present) + " |"
    lines = [header, "|" + "---|" * (4 + len(present))]
    for c in cells:
        values = " | ".join(_fmt(c[m]) for m in present)
        lines.append(f"| {c['model']} | {c['steps']} | {c['w']:g} | {c['n']} | {values} |")
    return "\n".join(lines) + "\n"


def _fmt(interval: dict) -> str:
    return f"{interval['value']:.3g} [{interval['low']:.3g}, {interval['high']:.3g}]"


PLOTS = ("fid_vs_w.png", "is_vs_w.png", "fid_vs_is.png", "fid_vs_steps.png")


def write_report(results: dict, out: Path, extra_markdown: str = "") -> None:
    """results.json, results.md and the four plots, all appearing together or not at all."""
    from cfgengine.figures import save_metric_plots

    paths = [out / "results.json", out / "results.md", *(out / p for p in PLOTS)]
    with atomic_paths(*paths) as (js, md, *pngs):
        Path(js).write_text(json.dumps(results, indent=1) + "\n")
        Path(md).write_text(_markdown(results) + extra_markdown)
        save_metric_plots(results["cells"], pngs)


def _markdown(results: dict) -> str:
    c = results["config"]
    return (f"# cfgengine eval: {results['dataset']}\n\n{c['n']} samples per cell, seed "
            f"{c['seed']}, sampler {c['sampler']} (v = {c['v']}), features {results['feature_key']}"
            f" (reference: {results['reference_n']} real images), k = {c['k']}; intervals: "
            f"95% percentile bootstrap, {c['rounds']} resamples within each class, re-centred "
            f"on the estimate.\n\n"
            + markdown_table(results["cells"]))
