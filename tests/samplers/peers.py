"""The peers the samplers are tested against, loaded as they are installed: k-diffusion's
`sampling` module (its package __init__ imports torchvision, which does not import beside the CPU
torch wheel, so the module is loaded alone under a stub package holding the one `utils` helper it
calls) and the exact mixture as a denoiser in both parameterisations."""
from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from cfgengine import rng
from cfgengine.schedule import alpha_sigma


def load_k_sampling() -> types.ModuleType:
    """k_diffusion/sampling.py from the installed distribution, under a stub package."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, dims: x[(...,) + (None,) * (dims - x.ndim)]
    package.utils = utils
    stubs = {"k_diffusion": package, "k_diffusion.utils": utils}
    if importlib.util.find_spec("torchdiffeq") is None:  # only sample_dpm_adaptive's odeint
        stubs["torchdiffeq"] = types.SimpleNamespace(odeint=None)
    for name, module in stubs.items():
        sys.modules.setdefault(name, module)
    sampling_spec = importlib.util.spec_from_file_location("k_diffusion.sampling",
                                                           root / "sampling.py")
    module = importlib.util.module_from_spec(sampling_spec)
    sys.modules["k_diffusion.sampling"] = module
    sampling_spec.loader.exec_module(module)
    return module


class GuidedMixture:
    """The exact mixture's guided ε at weight w (eq. 6), float64: `eps(z, λ)` in VP and
    `denoised(x, σ)` in k-diffusion's σ-space (x = z/α, σ = e^(−λ/2), D = x − σ·ε)."""

    def __init__(self, mixture, labels: torch.Tensor, w: float):
        self.mixture, self.labels, self.w = mixture, labels, w
        self.null = torch.full_like(labels, mixture.num_classes)

    def eps(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        lam = logsnr.double().expand(z.shape[0])
        eps_c = self.mixture(z.double(), lam, self.labels)
        eps_u = self.mixture(z.double(), lam, self.null)
        return eps_c + self.w * (eps_c - eps_u)

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        lam = -2.0 * torch.log(sigma.double())
        alpha = alpha_sigma(lam)[0].reshape(-1, *([1] * (x.dim() - 1)))
        return x - sigma.double().reshape(alpha.shape) * self.eps(alpha * x, lam)


def counter_noise_sampler(sigmas: torch.Tensor, rows, seed: int, ids: torch.Tensor, shape):
    """k-diffusion's `noise_sampler(σ, σ_next)` returning the engine's draw for grid step i
    (σ = sigmas[i]): randn_like_rows at the key of the step's noisy row."""
    keys = {rows.steps[r]: key for r, (key, quiet) in enumerate(zip(rows.noise_keys, rows.quiet))
            if not quiet}

    def draw(sigma, sigma_next):
        step = int((sigmas == sigma).nonzero()[0, 0])
        if step not in keys:  # k-diffusion draws even where σ_up = 0 (η = 0)
            return torch.zeros(ids.shape[0], *shape, dtype=torch.float64)
        return rng.randn_like_rows(seed, ids, keys[step], shape).double()
    return draw


def k_sigmas(logsnr: torch.Tensor, final: float = math.inf) -> torch.Tensor:
    """The grid as k-diffusion's decreasing σ schedule ending at e^(−final/2) (0 for +∞)."""
    return torch.exp(-torch.cat([logsnr.double(), logsnr.new_tensor([final]).double()]) / 2)


def start_noise(seed: int, ids: torch.Tensor, shape) -> torch.Tensor:
    """z at the first grid point: the engine's key-0 draw, float64."""
    return rng.randn_like_rows(seed, ids, 0, shape).double()
