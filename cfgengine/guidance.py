"""Classifier-free guidance (paper eq. 6) and the doubled-batch GuidedDenoiser."""
from __future__ import annotations

import torch
from torch import nn


def guided_eps(eps_cond: torch.Tensor, eps_null: torch.Tensor,
               w: float | torch.Tensor) -> torch.Tensor:
    """ε̃ = (1 + w)·ε(z, c) − w·ε(z, ∅), computed as ε_c + w·(ε_c − ε_u); w a float or Tensor[B]."""
    if isinstance(w, torch.Tensor):
        w = w.to(eps_cond.dtype).reshape((-1,) + (1,) * (eps_cond.dim() - 1))
    return eps_cond + w * (eps_cond - eps_null)


class GuidedDenoiser(nn.Module):
    """Wraps a Denoiser: (z[B], λ[B], labels[B]) → eps2[2B], rows 0..B−1 conditional and B..2B−1
    null, from ONE forward of the wrapped net on the concatenated batch."""

    returns_doubled = True

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.num_classes = denoiser.num_classes
        self.sample_shape = tuple(denoiser.sample_shape)
        self.clip = getattr(denoiser, "clip", None)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        null = torch.full_like(labels, self.num_classes)
        z2 = torch.cat([z, z])  # (2B, *S)
        return self.denoiser(z2, torch.cat([logsnr, logsnr]), torch.cat([labels, null]))
