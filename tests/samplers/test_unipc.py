"""UniPC's rows against diffusers' UniPCMultistepScheduler (installed; bh2, x0 prediction,
lower_order_final, final σ = 0 or σ_min) on a diffusers scheduler's own timesteps: the engine's
grid is λ_i = −2·ln σ_i of the scheduler's σ_i, and the exact mixture's guided ε drives both. The
scheduler's σ table is promoted to float64 so both sides run in float64."""
from __future__ import annotations

import pytest
import torch

from cfgengine.samplers import sampler_rows
from cfgengine.toy import ring_mixture
from tests.samplers.peers import GuidedMixture, start_noise
from tests.samplers.rows import run_rows

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers on numpy 2

TOL = 1e-4
SEED = 3
BATCH = 40


def diffusers_sample(scheduler, guided: GuidedMixture, z: torch.Tensor) -> torch.Tensor:
    sample = z.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        lam = -2.0 * torch.log(scheduler.sigmas[i : i + 1])
        sample = scheduler.step(guided.eps(sample, lam), timestep, sample).prev_sample
    return sample


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps, config", [
    (5, {}), (10, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    (25, {"timestep_spacing": "trailing"}), (12, {"use_karras_sigmas": True}),
    (8, {"final_sigmas_type": "sigma_min"}),  # the last step ends at σ_min > 0: z there
])
def test_unipc_matches_diffusers(order, steps, config):
    scheduler = diffusers.UniPCMultistepScheduler(solver_order=order, **config)
    scheduler.set_timesteps(steps)
    scheduler.sigmas = scheduler.sigmas.double()
    assert len(scheduler.timesteps) == steps
    lam = -2.0 * torch.log(scheduler.sigmas)  # +∞ at a final σ = 0
    mixture = ring_mixture()
    labels = torch.arange(BATCH) % mixture.num_classes
    guided = GuidedMixture(mixture, labels, w=1.5)
    ids = torch.arange(BATCH)
    z = start_noise(SEED, ids, mixture.sample_shape)
    rows = sampler_rows("unipc", lam[:-1], final_logsnr=float(lam[-1]), order=order)
    assert rows.table.shape[0] == steps  # one network evaluation per step
    ours = run_rows(rows, guided.eps, z, SEED, ids)
    theirs = diffusers_sample(scheduler, guided, z)
    err = float((ours - theirs).abs().max())
    assert err < TOL, f"unipc order {order} vs diffusers: max |Δ| = {err:.3g}"
