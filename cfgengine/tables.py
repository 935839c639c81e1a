"""Coefficient tables for the paper's ancestral sampler (Algorithm 2, v) and DDIM (η) — pure functions.

Every step is x̂ = clip((z − σ·ε̃)/α), z' = c_z·z + c_x·x̂ + s·n (docs/design.md §1). A table is float32
[T, 5] with rows (α, σ, c_z, c_x, s) at λ_t; the last row is (α, σ, 0, 1, 0) so that z' = x̂.
Coefficients are computed in float64 and rounded once.
"""
from __future__ import annotations

import math

import torch

from cfgengine.schedule import LOGSNR_MAX, LOGSNR_MIN, alpha_sigma, logsnr_grid

SAMPLERS = ("ancestral", "ddim")
ALPHA, SIGMA, C_Z, C_X, NOISE = range(5)


def ancestral_coefficients(logsnr: torch.Tensor, v: float = 0.3):
    """Algorithm 2 between consecutive grid points: μ = r·(α'/α)·z + (1 − r)·α'·x̂,
    var = ((1 − r)·σ'²)^(1−v) · ((1 − r)·σ²)^v, r = e^(λ − λ'). Returns (c_z, c_x, s) for t < T−1."""
    lam, lam_next = logsnr[:-1], logsnr[1:]
    alpha, sigma = alpha_sigma(lam)
    alpha_next, sigma_next = alpha_sigma(lam_next)
    r = torch.exp(lam - lam_next)
    one_minus_r = -torch.expm1(lam - lam_next)
    c_z = r * alpha_next / alpha
    c_x = one_minus_r * alpha_next
    var = (one_minus_r * sigma_next**2) ** (1 - v) * (one_minus_r * sigma**2) ** v
    return c_z, c_x, var.sqrt()


def ddim_coefficients(logsnr: torch.Tensor, eta: float = 0.0):
    """DDIM: s = η·(σ'/σ)·√(1 − α²/α'²), c_z = √(σ'² − s²)/σ, c_x = α' − α·c_z (ε re-derived from
    the clipped x̂). Returns (c_z, c_x, s) for t < T−1."""
    alpha, sigma = alpha_sigma(logsnr[:-1])
    alpha_next, sigma_next = alpha_sigma(logsnr[1:])
    s = eta * (sigma_next / sigma) * torch.sqrt(1 - alpha**2 / alpha_next**2)
    c_z = torch.sqrt(sigma_next**2 - s**2) / sigma
    c_x = alpha_next - alpha * c_z
    return c_z, c_x, s


def coefficient_table(steps: int, sampler: str = "ancestral", *, v: float = 0.3, eta: float = 0.0,
                      logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The sampler's table float32 [T, 5] of rows (α, σ, c_z, c_x, s), built on `device`."""
    check_sampler_args(steps, sampler, v, eta)
    logsnr = logsnr_grid(steps, logsnr_min, logsnr_max)  # float64 (T,)
    alpha, sigma = alpha_sigma(logsnr)
    if sampler == "ancestral":
        c_z, c_x, s = ancestral_coefficients(logsnr, v)
    else:
        c_z, c_x, s = ddim_coefficients(logsnr, eta)
    last = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    tail = torch.cat([torch.stack([c_z, c_x, s], dim=1), last[None]], dim=0)  # (T, 3)
    table = torch.cat([torch.stack([alpha, sigma], dim=1), tail], dim=1)  # (T, 5)
    return table.to(device=device, dtype=torch.float32)


def check_sampler_args(steps: int, sampler: str, v: float, eta: float) -> None:
    """Raise ValueError naming the first bad sampler setting."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer ≥ 2, got {steps!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    for name, value in (("v", v), ("eta", eta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
