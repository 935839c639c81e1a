"""The paper's cosine log-SNR schedule (Ho & Salimans 2022, §2 and §4) and the λ grids samplers
run on (docs/design.md, "Grids") — pure tensor functions."""
from __future__ import annotations

import math

import torch

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0
LOGSNR_RANGE = (LOGSNR_MIN, LOGSNR_MAX)
# |λ| ≤ 80 for any grid: α² = sigmoid(λ) and σ² = sigmoid(−λ) stay normal float32 numbers
# (e^−80 ≈ 1.8e−35 > 1.2e−38, the smallest), so the table and the λ the net sees are finite, and
# e^(±λ/2) of the schedules cannot overflow float64 (which would need |λ| > 1419)
LOGSNR_LIMIT = 80.0
GRIDS = ("cosine", "cosine-authors", "uniform", "karras")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


def logsnr_schedule(u: torch.Tensor, logsnr_min: float = LOGSNR_MIN,
                    logsnr_max: float = LOGSNR_MAX) -> torch.Tensor:
    """λ(u) = −2·log(tan(a·u + b)) for u ∈ [0, 1]; λ(0) = λmax, λ(1) = λmin."""
    b = math.atan(math.exp(-logsnr_max / 2))
    a = math.atan(math.exp(-logsnr_min / 2)) - b
    return -2.0 * torch.log(torch.tan(a * u + b))


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α = √sigmoid(λ), σ = √sigmoid(−λ), so α² + σ² = 1 and λ = log(α²/σ²)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def prediction_alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (α, σ) that read x̂ = (z − σ·ε)/α from a net's answer at λ: alpha_sigma(λ), except
    (1, 1) at λ = −∞, where α = 0 and the net answers z − x̂ (cfgengine.model)."""
    alpha, sigma = alpha_sigma(logsnr)
    pure_noise = torch.isneginf(logsnr)
    return torch.where(pure_noise, 1.0, alpha), torch.where(pure_noise, 1.0, sigma)


def logsnr_grid(steps: int, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX, *,
                grid: str = "cosine", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The increasing grid λ_0 < … < λ_{T−1} of `grid` on (logsnr_min, logsnr_max), computed in
    float64 and rounded once to `dtype`. "cosine" is Algorithm 2's (u_t = 1 − t/(T−1), ending at
    λmax); "cosine-authors" the authors' code's (u_t = 1 − t/T, never at λmax); "uniform" uniform
    in λ; "karras" Karras et al.'s ρ = 7 spacing in σ/α = e^(−λ/2)."""
    check_grid_args(steps, grid, logsnr_min, logsnr_max)
    t = torch.arange(steps, dtype=torch.float64)
    if grid == "cosine":
        lam = logsnr_schedule(1.0 - t / (steps - 1), logsnr_min, logsnr_max)
    elif grid == "cosine-authors":
        lam = logsnr_schedule(1.0 - t / steps, logsnr_min, logsnr_max)
    elif grid == "uniform":
        lam = logsnr_min + (logsnr_max - logsnr_min) * t / (steps - 1)
    else:
        lam = karras_logsnr(t / (steps - 1), logsnr_min, logsnr_max)
    return lam.to(dtype)


def karras_logsnr(ramp: torch.Tensor, logsnr_min: float, logsnr_max: float,
                  rho: float = KARRAS_RHO) -> torch.Tensor:
    """λ = −2·ln σ with σ = (σmax^(1/ρ) + ramp·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ, σ = e^(−λ/2), so
    ramp 0 → λmin and ramp 1 → λmax. Computed as ρ·log of the ramp so σmax = e^10 stays exact."""
    root_max = math.exp(-logsnr_min / (2 * rho))  # σmax^(1/ρ)
    root_min = math.exp(-logsnr_max / (2 * rho))  # σmin^(1/ρ)
    return -2.0 * rho * torch.log(root_max + ramp * (root_min - root_max))


def check_grid_args(steps, grid: str, logsnr_min: float, logsnr_max: float) -> None:
    """Raise ValueError naming the first bad grid setting."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer ≥ 2, got {steps!r}")
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    check_logsnr_range((logsnr_min, logsnr_max))


def check_logsnr_range(logsnr_range) -> tuple[float, float]:
    """(lo, hi) as floats; ValueError unless two finite numbers with lo < hi."""
    try:
        lo, hi = (float(x) for x in logsnr_range)
    except (TypeError, ValueError):
        raise ValueError(f"logsnr_range must be two numbers (lo, hi), got {logsnr_range!r}") \
            from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"logsnr_range must be finite with lo < hi, got ({lo:g}, {hi:g})")
    check_logsnr_limit(lo, hi, "logsnr_range")
    return lo, hi


def check_logsnr_limit(lo: float, hi: float, what: str) -> None:
    """ValueError unless −LOGSNR_LIMIT ≤ lo and hi ≤ LOGSNR_LIMIT (see LOGSNR_LIMIT)."""
    if lo < -LOGSNR_LIMIT or hi > LOGSNR_LIMIT:
        raise ValueError(f"{what} ({lo:g}, {hi:g}) is outside [-{LOGSNR_LIMIT:g}, "
                         f"{LOGSNR_LIMIT:g}]: beyond it α² or σ² = sigmoid(±λ) is no normal "
                         "float32 number")


def check_logsnr(logsnr) -> torch.Tensor:
    """A user-given grid as a float64 CPU tensor; ValueError unless it is a 1-D floating tensor
    of ≥ 2 finite, strictly increasing λ values — except that λ_0 may be −∞ (α = 0: pure noise,
    where a flow model starts; the net answers its data prediction there, cfgengine.model)."""
    if not isinstance(logsnr, torch.Tensor) or not logsnr.is_floating_point() \
            or logsnr.dim() != 1:
        raise ValueError("logsnr must be a 1-D floating-point tensor of increasing λ values")
    lam = logsnr.detach().to("cpu", torch.float64)
    if lam.numel() < 2:
        raise ValueError(f"logsnr must hold at least 2 values, got {lam.numel()}")
    first = float(lam[0])
    if not bool(torch.isfinite(lam[1:]).all()) or math.isnan(first) or first == math.inf:
        raise ValueError("logsnr must be finite (only logsnr[0] may be -inf)")
    finite = lam[1:] if first == -math.inf else lam
    check_logsnr_limit(finite.min().item(), finite.max().item(), "logsnr")
    drops = (lam[1:] <= lam[:-1]).nonzero()
    if drops.numel():
        i = int(drops[0, 0])
        raise ValueError(f"logsnr must be strictly increasing, but logsnr[{i + 1}] = "
                         f"{lam[i + 1].item():g} ≤ logsnr[{i}] = {lam[i].item():g}")
    return lam


def sample_logsnr(n: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Training-time λ = λ(u), u ~ U(0, 1) (paper §2), float32 [n]."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return logsnr_schedule(u).to(torch.float32)
