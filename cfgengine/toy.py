"""Class-conditional Gaussian mixtures with the exact ε — a Denoiser for testing samplers, and our oracle.

Each label y ∈ {0..K} (K is the null label) owns a weighted set of diagonal Gaussian components
N(m_c, diag(s_c²)) over the flattened sample. Under z = α·x + σ·ε a component becomes
N(α·m_c, diag(α²·s_c² + σ²)), so the exact noise prediction is

    ε(z, λ, y) = −σ·∇_z log p_λ(z | y) = σ · Σ_c r_c(z) · (z − α·m_c) / (α²·s_c² + σ²),

with r_c the posterior responsibilities of y's components. By default the null label's set is the
marginal over classes (uniform class prior), as a perfectly trained p_uncond model would learn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cfgengine.schedule import alpha_sigma


@dataclass(frozen=True)
class Components:
    """A weighted set of diagonal Gaussians: means [M, *S], stds [M, *S], weights [M] (sum 1)."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor


class GaussianMixture:
    """Exact class-conditional mixture Denoiser: `model(z, logsnr, labels) -> eps`."""

    def __init__(self, classes: list[Components], null: Components | None = None,
                 clip: float | None = None):
        if null is None:
            null = _marginal(classes)
        sets = list(classes) + [null]
        self.num_classes = len(classes)
        self.sample_shape = tuple(classes[0].means.shape[1:])
        self.clip = clip
        self.means = torch.cat([c.means.reshape(len(c.weights), -1) for c in sets]).double()
        stds = [c.stds.expand_as(c.means).reshape(len(c.weights), -1) for c in sets]
        self.variances = torch.cat(stds).double() ** 2  # (C, D)
        self.log_weights = _membership(sets)  # (K+1, C), −inf off the label's set

    def to(self, device: torch.device | str) -> "GaussianMixture":
        for name in ("means", "variances", "log_weights"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Exact ε for z [N, *S], λ [N], labels [N] (K = null); same dtype as z."""
        zf = z.reshape(z.shape[0], -1).double()  # (N, D)
        alpha, sigma = (t.double()[:, None, None] for t in alpha_sigma(logsnr.double()))
        var = alpha**2 * self.variances + sigma**2  # (N, C, D)
        diff = zf[:, None, :] - alpha * self.means  # (N, C, D)
        resp = self._responsibilities(diff, var, labels)  # (N, C)
        eps = sigma[:, :, 0] * torch.einsum("nc,ncd->nd", resp, diff / var)
        return eps.reshape(z.shape).to(z.dtype)

    def _responsibilities(self, diff, var, labels):
        log_n = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)  # (N, C)
        return torch.softmax(log_n + self.log_weights[labels], dim=1)

    def log_prob(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Data log-density log p(x | y) [N] (float64)."""
        diff = x.reshape(x.shape[0], -1).double()[:, None, :] - self.means
        var = self.variances.expand_as(diff)
        log_n = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        return torch.logsumexp(log_n + self.log_weights[labels], dim=1)

    def log_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """True log p(c | x) [N, K] under a uniform class prior (float64)."""
        per_class = torch.stack([
            self.log_prob(x, torch.full((x.shape[0],), c, device=x.device))
            for c in range(self.num_classes)], dim=1)
        return torch.log_softmax(per_class, dim=1)

    def sample_data(self, labels: torch.Tensor, generator: torch.Generator | None = None):
        """Exact samples x ~ p(x | y) [N, *S] (float32); label K samples the null model."""
        probs = self.log_weights[labels].exp()  # (N, C)
        comp = torch.multinomial(probs, 1, generator=generator)[:, 0]
        noise = torch.randn(self.means[comp].shape, generator=generator, dtype=torch.float64,
                            device=self.means.device)
        x = self.means[comp] + self.variances[comp].sqrt() * noise
        return x.reshape(len(labels), *self.sample_shape).float()


def _marginal(classes: list[Components]) -> Components:
    """All classes' components, each class weighted 1/K."""
    k = len(classes)
    return Components(torch.cat([c.means for c in classes]),
                      torch.cat([c.stds.expand_as(c.means) for c in classes]),
                      torch.cat([c.weights / k for c in classes]))


def _membership(sets: list[Components]) -> torch.Tensor:
    """log-weight matrix (labels, components) with −inf where a component is not the label's."""
    sizes = [len(c.weights) for c in sets]
    table = torch.full((len(sets), sum(sizes)), -math.inf, dtype=torch.float64)
    start = 0
    for label, (size, c) in enumerate(zip(sizes, sets)):
        table[label, start:start + size] = torch.log(c.weights.double() / c.weights.sum())
        start += size
    return table


def linear_gaussian(means: torch.Tensor, stds: torch.Tensor, null_mean: torch.Tensor,
                    null_std: torch.Tensor) -> GaussianMixture:
    """Every class (means[k], stds[k]) and the null model are single Gaussians: ε is affine in z."""
    one = torch.ones(1)
    classes = [Components(m[None], s[None], one) for m, s in zip(means, stds)]
    return GaussianMixture(classes, Components(null_mean[None], null_std[None], one))


def ring_mixture(num_classes: int = 5, per_class: int = 3, radius: float = 0.7,
                 std: float = 0.12) -> GaussianMixture:
    """2-D points: num_classes·per_class components on a ring, neighbours from different classes,
    so classes overlap and guidance visibly pulls samples away from the boundaries."""
    n = num_classes * per_class
    angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # (n, 2)
    classes = [Components(centres[k::num_classes], torch.full((per_class, 2), std),
                          torch.ones(per_class)) for k in range(num_classes)]
    return GaussianMixture(classes)


def image_mixture(num_classes: int = 4, shape: tuple[int, ...] = (1, 8, 8), per_class: int = 2,
                  seed: int = 0) -> GaussianMixture:
    """Small images: each component a smooth random pattern in [−0.7, 0.7] with per-pixel stds in
    [0.05, 0.2]; clip = 1 as for images. A dataset whose exact ε is known."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((num_classes * per_class, shape[0], 3, 3), generator=gen) * 1.4 - 0.7
    means = torch.nn.functional.interpolate(coarse, size=shape[1:], mode="bilinear",
                                            align_corners=True)
    stds = 0.05 + 0.15 * torch.rand(means.shape, generator=gen)
    classes = [Components(means[k::num_classes], stds[k::num_classes], torch.ones(per_class))
               for k in range(num_classes)]
    return GaussianMixture(classes, clip=1.0)
