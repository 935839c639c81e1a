"""Classifier-free guidance (paper eq. 6), the doubled-batch GuidedDenoiser, and the guidance rules
(CFG with rescale, CFG-Zero*, APG) and dynamic thresholding that the fused step applies."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from cfgengine.model import info


def guided_eps(eps_cond: torch.Tensor, eps_null: torch.Tensor,
               w: float | torch.Tensor) -> torch.Tensor:
    """ε̃ = (1 + w)·ε(z, c) − w·ε(z, ∅), computed as ε_c + w·(ε_c − ε_u); w a float or Tensor[B]."""
    if isinstance(w, torch.Tensor):
        w = w.to(eps_cond.dtype).reshape((-1,) + (1,) * (eps_cond.dim() - 1))
    return eps_cond + w * (eps_cond - eps_null)


def doubled_batch(z: torch.Tensor, logsnr: torch.Tensor, cond, null,
                  rows: torch.Tensor | None = None):
    """The ONE batch of a guided step: (z2, λ2, cond2) with rows 0..B−1 conditional and then the
    null rows — the same z and λ again with `null` (class ids, or a conditioning record whose
    tensor fields are concatenated field by field). `rows` (int64 indices) gives null rows only to
    those rows (serving: a w = 0 row costs one row); `null` then holds one entry per index."""
    if rows is None:
        return torch.cat([z, z]), torch.cat([logsnr, logsnr]), _concat(cond, null)
    return (torch.cat([z, z[rows]]), torch.cat([logsnr, logsnr[rows]]), _concat(cond, null))


def _concat(cond, null):
    if cond is None:  # an optional field of a conditioning record
        return None
    if isinstance(cond, torch.Tensor):
        return torch.cat([cond, null])
    return type(cond)(**{f.name: _concat(getattr(cond, f.name), getattr(null, f.name))
                         for f in dataclasses.fields(cond)})


def null_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The null label ∅ = num_classes for every row of `labels`."""
    return torch.full_like(labels, num_classes)


class GuidedDenoiser(nn.Module):
    """Wraps a Denoiser: (z[B], λ[B], labels[B]) → eps2[2B], rows 0..B−1 conditional and B..2B−1
    null, from ONE forward of the wrapped net on the doubled batch."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        facts = info(denoiser)
        self.num_classes, self.sample_shape, self.clip = (facts.num_classes, facts.sample_shape,
                                                          facts.clip)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.denoiser(*doubled_batch(z, logsnr, labels,
                                            null_labels(labels, self.num_classes)))


# --- Guidance rules (docs/design.md, "Guidance rules"): frozen configs, the math lives in the step.

Interval = tuple[float, float] | None


def _check_interval(config) -> None:
    """`interval` = (lo, hi) in λ with lo ≤ hi, or None (guided on every step); stored as a tuple
    of floats so the frozen config stays hashable."""
    interval = config.interval
    if interval is None:
        return
    if not (isinstance(interval, (tuple, list)) and len(interval) == 2
            and all(_is_real(x) and not math.isnan(x) for x in interval)):
        raise ValueError(f"interval must be (lo, hi) in logSNR, got {interval!r}")
    if interval[0] > interval[1]:
        raise ValueError(f"interval must have lo ≤ hi, got {tuple(interval)!r}")
    object.__setattr__(config, "interval", (float(interval[0]), float(interval[1])))


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(name: str, value, lo: float, hi: float, *, open_lo: bool = False,
                  open_hi: bool = False) -> None:
    """Raise a one-line ValueError unless `value` is a finite real number in the given range."""
    inside = (_is_real(value) and math.isfinite(value)
              and (lo < value if open_lo else lo <= value)
              and (value < hi if open_hi else value <= hi))
    if not inside:
        bounds = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CFG:
    """Classifier-free guidance, paper eq. 6: ε̃ = ε_c + w·(ε_c − ε_u); with rescale = φ > 0,
    Lin et al. 2023 §3.4: ε̃ = φ·ε̃·std(ε_c)/std(ε̃) + (1 − φ)·ε̃, std per sample, unbiased
    (diffusers `rescale_noise_cfg`).

    `refresh` = k reuses the guidance direction (cf. Castillo et al. 2023, "Adaptive Guidance"):
    the null branch runs on every k-th guided step (the 0th, kth, … inside the interval), which
    stores Δ = ε_c − ε_u per row; the guided steps between run the net on B rows and take
    ε̃ = ε_c + w·Δ from the stored Δ. k = 1 is plain CFG."""
    rescale: float = 0.0
    interval: Interval = None
    refresh: int = 1

    def __post_init__(self):
        _check_number("CFG rescale", self.rescale, 0.0, 1.0)
        _check_interval(self)
        if isinstance(self.refresh, bool) or not isinstance(self.refresh, int) \
                or self.refresh < 1:
            raise ValueError(f"CFG refresh must be an integer ≥ 1, got {self.refresh!r}")
        if self.refresh > 1 and self.rescale != 0.0:
            raise ValueError("CFG refresh > 1 reuses Δ = ε_c − ε_u and cannot rescale; "
                             "use one of rescale or refresh")

    @property
    def row_state(self) -> tuple[str, ...]:
        """Per-row buffers the rule keeps between steps: the stored Δ when refresh > 1."""
        return ("delta",) if self.refresh > 1 else ()


@dataclasses.dataclass(frozen=True)
class ZeroStar:
    """CFG-Zero* (Fan et al. 2025), the optimised scale: s* = ⟨ε_c, ε_u⟩/(⟨ε_u, ε_u⟩ + 1e−8),
    ε̃ = s*·ε_u + (1 + w)·(ε_c − s*·ε_u) (diffusers `cfg_zero_star_scale`); no zero-init steps."""
    interval: Interval = None
    row_state: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        _check_interval(self)


@dataclasses.dataclass(frozen=True)
class APG:
    """Adaptive projected guidance (Sadat et al. 2024) in x̂ space: Δ = D_c − D_u, m ← Δ + β·m,
    Δ = m·min(1, r/‖m‖), x̂ = D_c + w·(Δ⊥ + η·Δ∥) with Δ∥ the projection of Δ on D_c (diffusers
    `normalized_guidance`, use_original_formulation=True). β < 0 is the paper's "reverse momentum";
    |β| < 1 keeps the running average bounded."""
    eta: float = 0.0
    momentum: float = 0.0
    norm_threshold: float = 0.0
    interval: Interval = None
    row_state: ClassVar[tuple[str, ...]] = ("momentum",)  # the running average m

    def __post_init__(self):
        _check_number("APG eta", self.eta, 0.0, math.inf, open_hi=True)
        _check_number("APG momentum", self.momentum, -1.0, 1.0, open_lo=True, open_hi=True)
        _check_number("APG norm_threshold", self.norm_threshold, 0.0, math.inf, open_hi=True)
        _check_interval(self)


@dataclasses.dataclass(frozen=True)
class DynamicThreshold:
    """Imagen's dynamic thresholding (Saharia et al. 2022), passed as `clip=`: s = quantile(|x̂|, p)
    per sample, s = clamp(s, 1, max_value), x̂ = clamp(x̂, −s, s)/s (diffusers
    `_threshold_sample`)."""
    p: float = 0.995
    max_value: float = 1.0

    def __post_init__(self):
        _check_number("DynamicThreshold p", self.p, 0.0, 1.0, open_lo=True)
        _check_number("DynamicThreshold max_value", self.max_value, 1.0, math.inf, open_hi=True)


def check_embedded_rule(rule) -> None:
    """A guidance-embedded net has no separate branches: plain CFG (with an interval, without
    rescale or refresh) only; ValueError in one line for any other rule."""
    if rule is not None and not (isinstance(rule, CFG) and rule.rescale == 0
                                 and rule.refresh == 1):
        raise ValueError(f"{rule!r} needs the conditional and null branches apart; this "
                         "guidance-distilled model only answers ε̃_w (use CFG(), optionally "
                         "with an interval)")


RULE_NAMES = {"cfg": CFG, "zero_star": ZeroStar, "apg": APG}  # CLI and HTTP spellings
RULES = tuple(RULE_NAMES.values())
