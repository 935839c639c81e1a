"""The paper's cosine log-SNR schedule (Ho & Salimans 2022, §2 and §4) as pure tensor functions."""
from __future__ import annotations

import math

import torch

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def logsnr_schedule(u: torch.Tensor, logsnr_min: float = LOGSNR_MIN,
                    logsnr_max: float = LOGSNR_MAX) -> torch.Tensor:
    """λ(u) = −2·log(tan(a·u + b)) for u ∈ [0, 1]; λ(0) = λmax, λ(1) = λmin."""
    b = math.atan(math.exp(-logsnr_max / 2))
    a = math.atan(math.exp(-logsnr_min / 2)) - b
    return -2.0 * torch.log(torch.tan(a * u + b))


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α = √sigmoid(λ), σ = √sigmoid(−λ), so α² + σ² = 1 and λ = log(α²/σ²)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def logsnr_grid(steps: int, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Algorithm 2's grid λ_0 = λmin < … < λ_{T−1} = λmax, uniform in u (u_t = 1 − t/(T−1))."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    u = 1.0 - torch.arange(steps, dtype=torch.float64) / (steps - 1)
    return logsnr_schedule(u, logsnr_min, logsnr_max).to(dtype)


def sample_logsnr(n: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Training-time λ = λ(u), u ~ U(0, 1) (paper §2), float32 [n]."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return logsnr_schedule(u).to(torch.float32)
