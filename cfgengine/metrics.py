"""Offline sample-quality metrics in the feature space of a small per-dataset classifier (no
downloads): Fréchet distance (Heusel et al. 2017, "FID" with Inception swapped for the dataset's
shipped classifier), an Inception-Score-style score from the same classifier's softmax (Salimans
et al. 2016), precision/recall of k-NN manifolds (Kynkäänniemi et al. 2019), the accuracy of the
requested class, and percentile-bootstrap intervals for all of them.

Ho & Salimans (2022, §4.1) report FID and IS on ImageNet; these are the same statistics on a
feature network that fits our small datasets, so values are comparable across our runs only.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cfgengine import distributed
from cfgengine.atomic import atomic_path

# A feature extractor maps images [N, C, H, W] in [−1, 1] to (features [N, F], probs [N, K] | None).
Extractor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
STATS_VERSION = 1  # bump when the cached reference layout changes


# ---------------------------------------------------------------------------------------------
# Closed-form statistics


@dataclass(frozen=True)
class Gaussian:
    """Mean [F] and covariance [F, F] of a feature set (float64), and how many rows made them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def gaussian_fit(features: np.ndarray) -> Gaussian:
    """Sample mean and unbiased covariance of features [N, F], in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be [N ≥ 2, F], got shape {f.shape}")
    return Gaussian(f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), len(f))


def moments(features: np.ndarray, center: np.ndarray) -> np.ndarray:
    """float64 [1 + F + F²]: the count, Σ (f − c) and Σ (f − c)(f − c)ᵀ of features [N, F] about
    a fixed centre c (e.g. the reference mean, to keep the sums' cancellation small). Sums add up
    across shards — an all-reduce gives the moments of the union (EDM2's FID statistics)."""
    f = np.asarray(features, dtype=np.float64).reshape(-1, len(center)) - center  # rows may be 0
    return np.concatenate([[len(f)], f.sum(0), (f.T @ f).ravel()])


def gaussian_from_moments(total: np.ndarray, center: np.ndarray) -> Gaussian:
    """`gaussian_fit` from summed `moments`: μ = c + S₁/n, Σ = (S₂ − S₁S₁ᵀ/n)/(n − 1)."""
    n, dim = int(round(total[0])), len(center)
    if n < 2:
        raise ValueError(f"a Gaussian fit needs at least 2 rows, got {n}")
    s1, s2 = total[1:1 + dim], total[1 + dim:].reshape(dim, dim)
    return Gaussian(center + s1 / n, (s2 - np.outer(s1, s1) / n) / (n - 1), n)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition; eigenvalues that
    rounding pushed below zero are clipped (a covariance of N < F rows is singular)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr √(Σ1·Σ2) = tr √(Σ1^½·Σ2·Σ1^½): the symmetric form has real, non-negative eigenvalues,
    so no complex round-off from a general `sqrtm` has to be discarded."""
    root = _psd_sqrt(sigma1)
    inner = root @ sigma2 @ root
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2·√(Σ1·Σ2)): the 2-Wasserstein distance² between two Gaussians
    (Dowson & Landau 1982), FID's formula. Clipped at 0 against round-off."""
    diff = a.mu - b.mu
    value = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) \
        - 2.0 * trace_sqrt_product(a.sigma, b.sigma)
    return max(float(value), 0.0)


def inception_score(probs: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))) over softmax rows [N, K] (Salimans et al. 2016), in one split:
    K for confident predictions spread evenly over K classes, 1 for identical predictions."""
    p = np.asarray(probs, dtype=np.float64)
    marginal = p.mean(0)
    # 0·log 0 = 0: log(1) where p = 0 rather than an epsilon that would bias the score
    log_ratio = np.log(np.where(p > 0, p, 1.0)) - np.log(np.where(p > 0, marginal, 1.0))
    return float(np.exp((p * log_ratio).sum(1).mean()))


def class_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose most likely class is the requested one."""
    return float(correct(probs, labels).mean())


def correct(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per sample, 1.0 where argmax probs equals the requested label."""
    return (np.asarray(probs).argmax(1) == np.asarray(labels)).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019)


def _pairwise(a: np.ndarray, b: np.ndarray, chunk: int = 2048):
    """Yield (start, distances [chunk, len(b)]) from rows of a to all rows of b, in float64."""
    tb = torch.from_numpy(np.asarray(b, dtype=np.float64))
    ta = torch.from_numpy(np.asarray(a, dtype=np.float64))
    for start in range(0, len(ta), chunk):
        yield start, torch.cdist(ta[start:start + chunk], tb)


def knn_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
    """Distance of each row to its k-th nearest other row: the radius of its hypersphere in the
    k-NN manifold estimate."""
    if not 1 <= k < len(features):
        raise ValueError(f"k must be in [1, {len(features)}), got {k}")
    radii = np.empty(len(features))
    for start, d in _pairwise(features, features):
        # column 0 after sorting is the row itself (distance 0)
        radii[start:start + len(d)] = d.kthvalue(k + 1, dim=1).values.numpy()
    return radii


def in_manifold(queries: np.ndarray, support: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Per query row, 1.0 if it lies inside some support hypersphere (distance ≤ that radius)."""
    inside = np.empty(len(queries))
    r = torch.from_numpy(np.asarray(radii, dtype=np.float64))
    for start, d in _pairwise(queries, support):
        inside[start:start + len(d)] = (d <= r).any(1).numpy()
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall): the share of fake samples inside the real manifold, and of real samples
    inside the fake manifold, each manifold the union of k-NN hyperspheres."""
    hits = manifold_hits(real, fake, k)
    return float(hits[0].mean()), float(hits[1].mean())


def manifold_hits(real: np.ndarray, fake: np.ndarray, k: int = 3,
                  real_radii: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample indicators behind precision (one per fake row) and recall (one per real row)."""
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    return in_manifold(fake, real, real_radii), in_manifold(real, fake, knn_radii(fake, k))


# ---------------------------------------------------------------------------------------------
# Bootstrap


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile-bootstrap interval."""

    value: float
    low: float
    high: float

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, *,
              strata: np.ndarray | None = None, rounds: int = 200, level: float = 0.95,
              seed: int = 0, value: float | None = None) -> Interval:
    """statistic(all indices) with the percentile interval of statistic(indices resampled with
    replacement) over `rounds` resamples (Efron & Tibshirani 1993, §13.3).

    `strata` (e.g. the requested class of each sample) resamples within each stratum, as the
    samples were drawn: with class-balanced cells, unstratified resamples vary the class counts,
    and with them the between-class covariance that dominates classifier features — that
    inflated FID's spread 4-10× against independent seeds. The interval is re-centred on the
    point estimate: duplicated rows shrink the covariance, biasing resampled FID upwards.
    `value` overrides statistic(all indices) where the caller has it already (from all-reduced
    moments)."""
    if rounds < 2 or not 0 < level < 1:
        raise ValueError("bootstrap needs rounds ≥ 2 and 0 < level < 1")
    gen = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else \
        [np.flatnonzero(strata == s) for s in np.unique(strata)]
    values = [statistic(np.concatenate([g[gen.integers(0, len(g), len(g))] for g in groups]))
              for _ in range(rounds)]
    tail = 50 * (1 - level)
    low, median, high = np.percentile(values, [tail, 50, 100 - tail])
    value = float(statistic(np.arange(n))) if value is None else float(value)
    return Interval(value, value - float(median - low), value + float(high - median))


def compare(a: Interval, b: Interval) -> str:
    """'lower', 'higher' (a against b) when the intervals are disjoint, else 'inconclusive'."""
    if a.overlaps(b):
        return "inconclusive"
    return "lower" if a.value < b.value else "higher"


# ---------------------------------------------------------------------------------------------
# Feature extractors and the cached reference statistics of real data


@torch.no_grad()
def extract(extractor: Extractor, x: torch.Tensor, batch: int = 1000):
    """(features [N, F] float64, probs [N, K] float64 | None) in batches of `batch` images."""
    parts = [extractor(part) for part in x.split(batch)]
    features = torch.cat([f for f, _ in parts]).double().numpy()
    has_probs = parts[0][1] is not None
    probs = torch.cat([p for _, p in parts]).double().numpy() if has_probs else None
    return features, probs


def classifier_extractor(net: torch.nn.Module) -> Extractor:
    """A cfgengine Classifier as extractor: pooled features and the softmax of its head."""
    def run(x: torch.Tensor):
        features = net.features(x.float())
        return features, torch.softmax(net.head(features).double(), dim=1)
    return run


def network_extractor(path: str | Path, trust_code: bool = False) -> Extractor:
    """A feature network file the user already has (e.g. Inception-v3; we never download one): a
    torch.export program (.pt2) or a TorchScript module (other suffixes, the format most published
    Inception ports use). Called on float images [N, 3, H, W] in [0, 255] — grey images repeated to
    three channels — it returns features [N, F], or a tuple (features, logits)."""
    module = _load_network(Path(path), trust_code)

    def run(x: torch.Tensor):
        x = (x.float().clamp(-1, 1) + 1) * 127.5
        out = module(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
        if isinstance(out, (tuple, list)):
            return out[0].flatten(1), torch.softmax(out[1].double(), dim=1)
        return out.flatten(1), None
    return run


def _load_network(path: Path, trust_code: bool = False):
    """A torch.export program is data once every pickled member passes the weights-only
    unpickler (checked here first, so torch.export.load never takes its pickle fallback);
    TorchScript is code: it loads only when trusted (cfgengine.trust)."""
    import io

    from cfgengine import trust

    data = path.read_bytes()  # read once: the bytes checked are the bytes loaded
    if path.suffix == ".pt2":
        check_weights_only_archive(path, data)
        return torch.export.load(io.BytesIO(data)).module()
    trust.check_bytes(data, path, "a TorchScript module", trust_code)
    with warnings.catch_warnings():  # TorchScript is deprecated, yet it is how Inception ships
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def check_weights_only_archive(path: Path, contents: bytes) -> None:
    """ValueError unless `contents` (read from `path`) is a zip whose pickled members (sample inputs, pickled weights
    or constants) all load with torch.load(weights_only=True): nothing in it can run on
    unpickling. Raw tensor payloads that the archive's JSON configs describe are bytes only."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(contents)) as archive:
            data = {name: archive.read(name) for name in archive.namelist()
                    if "/data/" in f"/{name}" and not name.endswith("/")}
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a torch.export .pt2 archive ({type(err).__name__})") from err
    raw = _raw_payloads(data)
    for name, payload in data.items():
        if name.endswith(".json") or name in raw:
            continue
        try:
            torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as err:  # any unpickling failure means the member is not plain data
            raise ValueError(f"{path}: refusing feature network: member {name} is not plain "
                             "tensors (a pickle that could run code)") from err


def _raw_payloads(data: dict[str, bytes]) -> set[str]:
    """Members a pt2 payload config (`*_config.json`) marks as raw tensor bytes (use_pickle
    false): the loader reads them with torch.as_strided, never unpickles them."""
    import json

    raw = set()
    for name, payload in data.items():
        if not name.endswith("_config.json"):
            continue
        folder = name.rsplit("/", 1)[0]
        try:
            entries = json.loads(payload).get("config", {}).values()
            raw |= {f"{folder}/{e['path_name']}" for e in entries if e.get("use_pickle") is False}
        except (ValueError, AttributeError, TypeError, KeyError):
            continue  # an unreadable config marks nothing raw: its members get checked
    return raw


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits): the cache key of its feature space."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Reference:
    """Features of real images and their Gaussian fit, in one extractor's feature space."""

    features: np.ndarray
    gaussian: Gaussian
    key: str


def reference(dataset_name: str, extractor: Extractor, key: str, cache_dir: str | Path | None,
              *, n: int = 10_000, seed: int = 0) -> Reference:
    """Reference statistics of a dataset's real images, read from `cache_dir/<dataset>-<key>.npz`
    when its key matches, else computed (all images of a finite dataset, `n` seeded draws of a
    procedural one) and cached atomically."""
    key = f"v{STATS_VERSION}-{dataset_name}-{key}-{n}-{seed}"
    path = None if cache_dir is None else Path(cache_dir) / f"{dataset_name}-{_short(key)}.npz"
    cached = _read_reference(path, key)
    if cached is not None:
        return cached
    features, _ = extract(extractor, real_images(dataset_name, n, seed))
    ref = Reference(features, gaussian_fit(features), key)
    if path is not None and distributed.is_main():  # one writer under torchrun
        _write_reference(path, ref)
    return ref


def _short(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def real_images(dataset_name: str, n: int, seed: int) -> torch.Tensor:
    """Every image of a finite dataset, or `n` class-balanced draws of a procedural one."""
    from cfgengine.data import ArrayDataset, load_dataset

    dataset = load_dataset(dataset_name)
    if isinstance(dataset, ArrayDataset):
        return dataset.x
    labels = torch.arange(n) % dataset.num_classes
    return dataset.examples(labels, torch.Generator().manual_seed(seed))


def _read_reference(path: Path | None, key: str) -> Reference | None:
    """The cached reference, or None when absent, unreadable or made for another key."""
    if path is None or not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None  # another classifier or layout: recompute, then overwrite
            return Reference(f["features"], Gaussian(f["mu"], f["sigma"], int(f["n"])), key)
    except (OSError, KeyError, ValueError, EOFError):
        return None


def _write_reference(path: Path, ref: Reference) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, features=ref.features, mu=ref.gaussian.mu, sigma=ref.gaussian.sigma,
                 n=ref.gaussian.n, key=ref.key)
