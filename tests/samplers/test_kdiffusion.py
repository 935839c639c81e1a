"""Each sampler's rows against k-diffusion's own sampler (the installed 0.1.1 `sampling` module)
on the exact Gaussian mixture in σ-space, on the same λ grid with a final σ = 0, k-diffusion's
noise_sampler returning the engine's counter noise at the same keys. Both run in float64."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from cfgengine.samplers import sampler_rows
from cfgengine.schedule import alpha_sigma, logsnr_grid
from cfgengine.toy import ring_mixture
from tests.samplers.peers import (GuidedMixture, counter_noise_sampler, k_sigmas,
                                  load_k_sampling, start_noise)
from tests.samplers.rows import run_rows

TOL = 1e-4
SEED = 7
BATCH = 48

# engine name, options → k-diffusion function, its keyword arguments
CASES = [
    ("euler_ancestral", {}, "sample_euler_ancestral", {}),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 0.8}, "sample_euler_ancestral",
     {"eta": 0.5, "s_noise": 0.8}),
    ("ddim", {"eta": 1.0}, "sample_euler_ancestral", {"eta": 1.0}),
    ("heun", {}, "sample_heun", {}),
    ("dpmpp_2s_ancestral", {}, "sample_dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, "sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    ("dpmpp_2m_sde", {}, "sample_dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver": "heun"}, "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_2m_sde", {"eta": 0.4, "s_noise": 1.2}, "sample_dpmpp_2m_sde",
     {"eta": 0.4, "s_noise": 1.2}),
    ("dpmpp_3m_sde", {}, "sample_dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", {"eta": 0.5}, "sample_dpmpp_3m_sde", {"eta": 0.5}),
]
# (grid, steps, λ range, the final λ: +∞ is σ = 0, a finite one ends the last step at σ > 0)
GRIDS = [("cosine", 12, (-12.0, 12.0), math.inf), ("karras", 9, (-14.0, 10.0), math.inf),
         ("uniform", 25, (-10.0, 8.0), math.inf), ("cosine", 10, (-12.0, 10.0), 13.0)]


def k_diffusion_sample(name: str, kwargs: dict, guided: GuidedMixture, lam: torch.Tensor,
                       ids: torch.Tensor, shape, rows, final: float = math.inf) -> torch.Tensor:
    """k-diffusion's sampler `name` from the engine's z_0, in σ-space (its x at the final σ)."""
    sampling = load_k_sampling()
    sigmas = k_sigmas(lam, final)
    x = start_noise(SEED, ids, shape) / alpha_sigma(lam[:1])[0]  # x = z/α at σ_0
    extra = {}
    if "noise_sampler" in inspect.signature(getattr(sampling, name)).parameters:
        extra["noise_sampler"] = counter_noise_sampler(sigmas, rows, SEED, ids, shape)
    return getattr(sampling, name)(guided.denoised, x, sigmas, disable=True, **kwargs, **extra)


@pytest.mark.parametrize("grid, steps, lam_range, final", GRIDS)
@pytest.mark.parametrize("sampler, options, k_name, k_kwargs", CASES)
def test_rows_match_k_diffusion(sampler, options, k_name, k_kwargs, grid, steps, lam_range, final):
    mixture = ring_mixture()
    labels = torch.arange(BATCH) % mixture.num_classes
    guided = GuidedMixture(mixture, labels, w=2.0)
    ids = torch.arange(BATCH) * 3 + 1
    lam = logsnr_grid(steps, *lam_range, grid=grid)
    rows = sampler_rows(sampler, lam, final_logsnr=final, **options)
    z = run_rows(rows, guided.eps, start_noise(SEED, ids, mixture.sample_shape), SEED, ids)
    ours = z / alpha_sigma(torch.tensor(final, dtype=torch.float64))[0]  # x = z/α (1 at σ = 0)
    theirs = k_diffusion_sample(k_name, k_kwargs, guided, lam, ids, mixture.sample_shape, rows,
                                final)
    assert torch.isfinite(theirs).all()
    err = float((ours - theirs).abs().max())
    assert err < TOL, f"{sampler} {options} vs k-diffusion {k_name}: max |Δ| = {err:.3g}"
