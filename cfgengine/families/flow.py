"""Flow-matching and EDM-style (σ-parametrized) nets as cfgengine Denoisers (docs/models.md).

The engine's state is variance-preserving: z = α·x + σ·ε with α² + σ² = 1 and λ = log(α²/σ²).
Another parametrization x_t = a·x + b·ε with the same ratio a/b = e^(λ/2) is the same state scaled,
x_t = z·(a/α), so one λ grid serves every family and each wrapper converts the state to its net's
input and the net's output to ε:

- flow matching (rectified flow, SiT, SD3): x_t = (1 − t)·x + t·ε, the net predicts the velocity
  v = ε − x; t = σ/(α + σ) = sigmoid(−λ/2) and x_t = z/(α + σ). DDIM (η = 0) on its λ grid is
  exactly the flow's Euler step x_t' = x_t + (t' − t)·v.
- EDM (Karras et al. 2022): x_σ = x + σ·ε, a denoiser D(x; σ); σ = e^(−λ/2), x_σ = z/α. DDIM
  (η = 0) is EDM's Euler step x' = x + (σ' − σ)·(x − D)/σ.

A flow model starts at t = 1 (λ = −∞, α = 0), where ε = z says nothing about x: there the wrapper
answers z − x̂ = v in ε's slot, which the step reads back as x̂ (cfgengine.model,
cfgengine.schedule.prediction_alpha_sigma). Guidance is unchanged by the conversions: ε, v and D are
affine in one another at a fixed state, so eq. 6 on ε is eq. 6 on v or on D.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from cfgengine.model import ModelInfo
from cfgengine.schedule import alpha_sigma, logsnr_grid

EDM_SIGMA_RANGE = (0.002, 80.0)  # Karras et al. 2022, Table 1


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N] → [N, 1, …, 1] float32, broadcastable against `like`."""
    return values.float().reshape((-1,) + (1,) * (like.dim() - 1))


class _Family(nn.Module):
    """What both wrappers share: the user's net, its facts and its own λ grid."""

    def __init__(self, net: Callable, *, num_classes: int, sample_shape: tuple[int, ...],
                 logsnr_range: tuple[float, float], class_names: tuple[str, ...] = (),
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.logsnr_range = logsnr_range
        self.class_names = tuple(class_names)
        self._decode = decode

    def logsnr_grid(self, steps: int) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images from samples x: through the given decoder (a latent model's VAE), else x."""
        return x if self._decode is None else self._decode(x)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name=type(self.net).__name__, num_classes=self.num_classes,
                         sample_shape=self.sample_shape, logsnr_range=self.logsnr_range,
                         grid=self.logsnr_grid, decode=self._decode,
                         class_names=self.class_names)


class FlowMatching(_Family):
    """A velocity net `net(x_t, time, cond) -> v` (x_t = (1 − t)·x + t·ε, v = ε − x, time =
    t·time_scale: 1 for t ∈ [0, 1], 1000 for SD3-style nets) as a Denoiser. Its own grid starts at
    t = 1 (λ = −∞) and is warped by `shift` as t ↦ shift·t/(1 + (shift − 1)·t); the last step
    lands on x̂. Unwarped it is t_i = 1 − i/T, or with `num_train_timesteps` N the grid diffusers'
    FlowMatchEulerDiscreteScheduler(shift=…) runs: T points from 1 to shift-warped 1/N, evenly
    spaced — or, `dynamic_shift` (its use_dynamic_shifting, where `shift` = e^μ is chosen for the
    resolution and warps only the inference grid), from 1 to 1/N. `cond` is what the engine
    passes: class ids with `num_classes` the null label, or a TextCondition."""

    def __init__(self, net: Callable, *, num_classes: int, sample_shape: tuple[int, ...],
                 shift: float = 1.0, time_scale: float = 1.0,
                 num_train_timesteps: int | None = None, dynamic_shift: bool = False,
                 **facts):
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        if num_train_timesteps is not None and not (isinstance(num_train_timesteps, int)
                                                    and num_train_timesteps >= 2):
            raise ValueError(f"num_train_timesteps must be an integer ≥ 2 or None, got "
                             f"{num_train_timesteps!r}")
        super().__init__(net, num_classes=num_classes, sample_shape=sample_shape,
                         logsnr_range=(-20.0, 20.0), **facts)
        self.shift, self.time_scale = float(shift), float(time_scale)
        self.num_train_timesteps = num_train_timesteps
        self.dynamic_shift = bool(dynamic_shift)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, cond) -> torch.Tensor:
        alpha, sigma = (_rows(c, z) for c in alpha_sigma(logsnr.float()))
        t = sigma / (alpha + sigma)  # 1 at λ = −∞
        x_t = z.float() / (alpha + sigma)
        v = self.net(x_t, t.reshape(-1) * self.time_scale, cond).float()
        eps = x_t + (1.0 - t) * v
        return torch.where(alpha > 0, eps, v).to(z.dtype)  # α = 0: z − x̂ = t·v = v

    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def logsnr_grid(self, steps: int) -> torch.Tensor:
        """float64 λ [T] of the shift-warped t_i (class docstring): λ = 2·log((1 − t)/t),
        λ_0 = −∞."""
        if self.num_train_timesteps is None:
            t = 1.0 - torch.arange(steps, dtype=torch.float64) / steps
        else:
            lowest = torch.tensor(1.0 / self.num_train_timesteps, dtype=torch.float64)
            if not self.dynamic_shift:  # diffusers' training sigmas are shifted already
                lowest = self.shifted(lowest)
            t = torch.linspace(1.0, float(lowest), steps, dtype=torch.float64)
        t = self.shifted(t)
        return 2.0 * (torch.log1p(-t) - torch.log(t))


class EDM(_Family):
    """An EDM-style net as a Denoiser. With `sigma_data` (EDM's preconditioning, Karras et al.
    2022 Table 1): `net(c_in·x_σ, c_noise, cond) -> F` and D = c_skip·x_σ + c_out·F, c_noise =
    ln(σ)/4. With sigma_data=None the net is the denoiser itself: `net(x_σ, σ, cond) -> D`. Its
    own grid is Karras' ρ = 7 spacing on [σ_min, σ_max]; the last step lands on x̂."""

    def __init__(self, net: Callable, *, num_classes: int, sample_shape: tuple[int, ...],
                 sigma_data: float | None = 0.5, sigma_range=EDM_SIGMA_RANGE, **facts):
        sigma_min, sigma_max = (float(s) for s in sigma_range)
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"sigma_range must be 0 < σ_min < σ_max, got {sigma_range!r}")
        if sigma_data is not None and not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data must be a positive number or None, got {sigma_data!r}")
        super().__init__(net, num_classes=num_classes, sample_shape=sample_shape,
                         logsnr_range=(-2 * math.log(sigma_max), -2 * math.log(sigma_min)),
                         **facts)
        self.sigma_data = None if sigma_data is None else float(sigma_data)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, cond) -> torch.Tensor:
        alpha = _rows(alpha_sigma(logsnr.float())[0], z)
        sigma = _rows(torch.exp(-logsnr.float() / 2), z)  # EDM's σ = σ_vp/α
        x = z.float() / alpha
        if self.sigma_data is None:
            return ((x - self.net(x, sigma.reshape(-1), cond).float()) / sigma).to(z.dtype)
        c_in = torch.rsqrt(sigma**2 + self.sigma_data**2)
        out = self.net(c_in * x, torch.log(sigma.reshape(-1)) / 4, cond).float()
        # ε = (x − D)/σ with D = c_skip·x + c_out·F, written without the cancellation:
        return (c_in * (sigma * c_in * x - self.sigma_data * out)).to(z.dtype)

    def logsnr_grid(self, steps: int) -> torch.Tensor:
        return logsnr_grid(steps, *self.logsnr_range, grid="karras")
