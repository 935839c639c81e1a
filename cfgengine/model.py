"""The model contract: what the engine calls, and ONE record of what it knows about a model.

A denoiser is any callable `net(z[N, *S], logsnr[N], cond[N]) -> eps[N, *S]`: rows in, rows out,
each row its own λ and condition. For a class model `cond` is an int64 tensor of class ids in which
id `num_classes` is the null label ∅ (paper §3: one network serves ε(z, c) and ε(z, ∅)); for a text
model it is a `TextCondition` (its null rows: the encoded negative prompt, "" by default). A
guidance-distilled net (`guidance_embedded`) also takes w: `net(z, logsnr, cond, w[N]) -> ε̃_w`,
one row per guided row. At λ = −∞ (α = 0, pure noise: a flow model's first step) ε = z carries no
x̂, so there a net answers its data prediction in ε's slot as z − x̂ (cfgengine.families.flow;
cfgengine.schedule.prediction_alpha_sigma reads it back).

What the engine needs to know besides the call — classes, sample shape, clip bound, λ range, the
model's own grid, names — is a `ModelInfo`, made once where a model is loaded (`info(model)`) and
passed on; nothing else in the engine asks a model for attributes. A user's own callable needs only
`num_classes` and `sample_shape` (and optionally `clip`, `class_names`, `dataset`,
`guidance_embedded`, and `config`: a dataclass or dict of the settings its forward depends on);
a model that knows more carries a complete `ModelInfo` as its `info` attribute.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch

from cfgengine.schedule import LOGSNR_RANGE


@runtime_checkable
class Denoiser(Protocol):
    """ε for every row: `(z[N, *S], logsnr[N], cond[N]) -> eps[N, *S]`."""

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor,
                 cond: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TextCondition:
    """Prompt conditioning of N rows, as a text encoder gives it: token embeddings [N, L, D],
    optionally pooled embeddings [N, P] and an attention mask [N, L]. The doubled batch
    concatenates it field by field (cfgengine.guidance.doubled_batch)."""

    embeddings: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __getitem__(self, rows) -> "TextCondition":
        return TextCondition(*(None if t is None else t[rows] for t in self.fields()))

    def fields(self) -> tuple:
        return (self.embeddings, self.pooled, self.mask)

    def row_shapes(self) -> tuple:
        """Each field's per-row shape, in `fields` order (None where absent)."""
        return tuple(None if t is None else tuple(t.shape[1:]) for t in self.fields())

    def to(self, device) -> "TextCondition":
        return TextCondition(*(None if t is None else t.to(device) for t in self.fields()))


@dataclass(frozen=True)
class ModelInfo:
    """A model's facts. `num_classes` K: class ids 0..K−1, K the null label. `grid(steps)` is the
    model's own float64 λ grid (e.g. a diffusers scheduler's timesteps), used when the caller keeps
    the default grid; `final_logsnr` is where its last step lands (+∞: at x̂); `steps_to(steps)`,
    when set, is the float64 λ each step of the own grid steps to (a pipeline's exact pairs, which
    may differ from the next grid point; cfgengine.tables.step_plan's targets). `backend` and
    `precision` are set for exported files, which run only on their own runtime and precision.
    `config` is what the model's forward depends on besides its tensors and code (JSON-able: a
    prediction type, a net's config): cached graphs and digests derive from it
    (cfgengine.provenance), so a model states it here rather than being probed for it."""

    name: str
    num_classes: int
    sample_shape: tuple[int, ...]
    clip: float | None = None
    logsnr_range: tuple[float, float] = LOGSNR_RANGE
    grid: Callable[[int], torch.Tensor] | None = None
    final_logsnr: float = math.inf
    steps_to: Callable[[int], torch.Tensor] | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    class_names: tuple[str, ...] = ()
    dataset: str = ""  # the dataset a cfgengine model was trained on (its eval's feature space)
    guidance_embedded: bool = False
    conditioning: str = "class"  # "class": int64 ids (K = null); "text": TextCondition rows
    encode: Callable[[list[str]], TextCondition] | None = None  # prompts → rows ("text" models)
    backend: str | None = None
    precision: str | None = None
    config: dict = field(default_factory=dict, compare=False)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def exported(self) -> bool:
        return self.backend is not None


def info(model) -> ModelInfo:
    """The model's `ModelInfo`: its own `info` when it carries one, else built from the minimal
    contract of a user's callable (num_classes, sample_shape; optionally clip, class_names,
    dataset, guidance_embedded, config). ValueError naming what is missing."""
    own = getattr(model, "info", None)
    if isinstance(own, ModelInfo):
        return own
    name = type(model).__name__
    missing = [a for a in ("num_classes", "sample_shape") if not hasattr(model, a)]
    if missing:
        raise ValueError(f"{name} is not a denoiser cfgengine can sample: it lacks "
                         f"{' and '.join(missing)} (see cfgengine.model)")
    clip = getattr(model, "clip", None)
    return ModelInfo(name=name, num_classes=int(model.num_classes),
                     sample_shape=tuple(int(d) for d in model.sample_shape),
                     clip=None if clip is None else float(clip),
                     class_names=tuple(getattr(model, "class_names", ()) or ()),
                     dataset=str(getattr(model, "dataset", "") or ""),
                     guidance_embedded=bool(getattr(model, "guidance_embedded", False)),
                     config=_config(getattr(model, "config", None)))


def _config(config) -> dict:
    """A stated config as a dict (a dataclass's fields, a mapping's items); {} for none."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return dict(config) if isinstance(config, dict) else {}
