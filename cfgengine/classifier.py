"""Small per-dataset image classifiers: they check that guided samples show the requested class
(fidelity) and, through their pooled features, how varied the samples are (diversity) — the two sides
of the trade-off guidance controls (Ho & Salimans 2022, §4). Later also the feature network for
offline FID / IS (metrics.py).

Train: `cfgengine train-classifier --data shapes` (weights → cfgengine/assets/classifier-shapes
.safetensors). Check a model: `cfgengine classifier-accuracy --ckpt default --w 0,0.3,1,4`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from cfgengine import checkpoint
from cfgengine.data import ArrayDataset, ImageDataset, load_dataset

CLASSIFIER_FORMAT = "cfgengine-classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture: three conv stages of width w, 2w, 4w (stride 2 between them)."""

    num_classes: int
    in_channels: int = 3
    image_size: int = 16
    width: int = 32


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Cross-entropy training with small Gaussian input noise (so slightly imperfect samples still
    classify as their shape) and cosine learning-rate decay."""

    data: str = "shapes"
    image_size: int | None = None
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    input_noise: float = 0.05
    holdout: float = 0.2
    heldout_size: int = 4000
    seed: int = 0
    out: str | None = None

    def __post_init__(self):
        """Every setting checked before any work (steps 0 or holdout nan trained to nothing)."""
        positive = {"steps": self.steps, "batch_size": self.batch_size,
                    "heldout_size": self.heldout_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
        for name in ("lr", "weight_decay", "input_noise", "holdout"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number ≥ 0, got "
                                 f"{getattr(self, name)}")
        if self.lr == 0 or not 0 < self.holdout < 1:
            raise ValueError(f"--lr must be > 0 and --holdout in (0, 1), got {self.lr}, "
                             f"{self.holdout}")
        if not 0 <= self.seed < 2**63 or (self.image_size is not None and self.image_size < 1):
            raise ValueError("--seed must be in [0, 2^63) and --image-size ≥ 1")


class Classifier(nn.Module):
    """CNN → globally pooled features [N, 4·width] (`features`) → class logits [N, K] (`forward`)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], config.in_channels
        for i, c_out in enumerate((config.width, 2 * config.width, 4 * config.width)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1),
                       nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # (N, 4·width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def heldout_split(dataset: ImageDataset, config: ClassifierTrainConfig):
    """(training dataset, held-out (x, y)): a seeded split of a finite dataset, or for a procedural
    one a fresh batch from a generator stream the training never touches."""
    if isinstance(dataset, ArrayDataset):
        train_set, heldout = dataset.split(config.holdout, config.seed)
        return train_set, (heldout.x, heldout.y)
    gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    return dataset, dataset.batch(config.heldout_size, gen)


@torch.no_grad()
def accuracy(net: Classifier, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Fraction of x classified as y."""
    predictions = torch.cat([net(part).argmax(1) for part in x.split(batch)])
    return float((predictions == y).float().mean())


def train_classifier(config: ClassifierTrainConfig, progress: bool = False) -> tuple[Classifier, float]:
    """Train on `config.data`; returns (classifier in eval mode, held-out accuracy)."""
    from tqdm import tqdm

    dataset = load_dataset(config.data, config.image_size)
    train_set, (x_held, y_held) = heldout_split(dataset, config)
    if len(y_held) == 0 or (isinstance(train_set, ArrayDataset) and len(train_set.y) == 0):
        raise ValueError(f"--holdout {config.holdout} leaves an empty held-out or training set "
                         f"for {config.data}")
    channels, size, _ = dataset.shape
    torch.manual_seed(config.seed)
    net = Classifier(ClassifierConfig(dataset.num_classes, channels, size))
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    for step in tqdm(range(config.steps), disable=not progress, unit="step"):
        x, y = train_set.batch(config.batch_size, gen)
        x = x + config.input_noise * torch.randn(x.shape, generator=gen)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # cosine decay to 0
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        optimizer.step()
    net.eval()
    return net, accuracy(net, x_held, y_held)


def classifier_path(dataset_name: str) -> Path:
    """The shipped classifier of a dataset."""
    return checkpoint.ASSETS / f"classifier-{dataset_name}.safetensors"


def save_classifier(net: Classifier, dataset: ImageDataset, heldout_accuracy: float,
                    path: str | Path) -> Path:
    """Weights + config, dataset and held-out accuracy as metadata."""
    return checkpoint.write_safetensors(
        net.state_dict(), path, CLASSIFIER_FORMAT, config=checkpoint.config_dict(net.config),
        dataset=checkpoint.dataset_dict(dataset.info), heldout_accuracy=heldout_accuracy)


def load_classifier(name_or_path: str | Path) -> Classifier:
    """A dataset name with a shipped classifier (`shapes`, `digits`) or a classifier file → the
    classifier in eval mode, carrying `dataset` and `heldout_accuracy`."""
    path = Path(name_or_path)
    if path.suffix != ".safetensors":
        path = classifier_path(str(name_or_path))
        if not path.exists():
            raise ValueError(f"no shipped classifier for dataset {name_or_path!r} "
                             f"(train one: cfgengine train-classifier --data {name_or_path})")
    weights, meta = checkpoint.read_safetensors(path, CLASSIFIER_FORMAT,
                                                ("config", "dataset", "heldout_accuracy"))
    net = Classifier(ClassifierConfig(**meta["config"]))
    net.load_state_dict(weights)
    net.dataset, net.heldout_accuracy = meta["dataset"]["name"], meta["heldout_accuracy"]
    return net.eval().requires_grad_(False)


def binomial_lower_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """Clopper–Pearson one-sided lower confidence bound on p from k successes in n trials: the p at
    which P(X ≥ k | p) = 1 − confidence (found by bisection; the tail grows with p)."""
    if k == 0:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _upper_tail(k, n, mid) < 1 - confidence else (low, mid)
    return low


def _upper_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), 0 < p < 1, summed in log space."""
    log_p, log_q = math.log(p), math.log1p(-p)
    return sum(math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                        + j * log_p + (n - j) * log_q) for j in range(k, n + 1))


@torch.no_grad()
def within_class_distance(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean L2 distance between features of distinct samples of the same class, averaged over
    classes — a diversity figure that collapses when samples of a class become alike."""
    means = []
    for k in labels.unique():
        f = features[labels == k].double()  # (n_k, F)
        n = f.shape[0]
        means.append(torch.cdist(f, f).sum() / (n * (n - 1)))  # diagonal distances are 0
    return float(torch.stack(means).mean())


@dataclass(frozen=True)
class GuidanceRow:
    """Samples at one w judged by the classifier: accuracy, its 95% lower bound, and diversity as
    the within-class feature distance relative to that of real data."""

    w: float
    accuracy: float
    lower_bound: float
    diversity: float


def guidance_report(model, classifier: Classifier, ws: list[float], *, steps: int = 256,
                    per_class: int = 16, seed: int = 0) -> list[GuidanceRow]:
    """Class accuracy and diversity of `per_class` samples per class at each w (model trained on a
    shipped dataset, whose real images give the diversity reference)."""
    from cfgengine.sampler import sample

    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    dataset = load_dataset(model.dataset, model.sample_shape[-1])
    real = dataset.examples(labels, torch.Generator().manual_seed(seed))
    real_distance = within_class_distance(classifier.features(real), labels)
    rows = []
    for w in ws:
        x = sample(model, labels, w=w, steps=steps, seed=seed)  # (K·per_class, C, H, W)
        rows.append(judge(classifier, x, labels, w, real_distance))
    return rows


@torch.no_grad()
def judge(classifier: Classifier, x: torch.Tensor, labels: torch.Tensor, w: float,
          real_distance: float) -> GuidanceRow:
    """One GuidanceRow for samples x of classes `labels`."""
    features = classifier.features(x)
    correct = int((classifier.head(features).argmax(1) == labels).sum())
    return GuidanceRow(w, correct / len(labels), binomial_lower_bound(correct, len(labels)),
                       within_class_distance(features, labels) / real_distance)
