"""DPM-Solver++(2M)'s coefficient rows against its update written out here from docs/design.md
(h, r, D_t and z_{t+1} in plain math), on every grid; the [T, 6] layout shared by all samplers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfgengine.schedule import GRIDS, logsnr_grid
from cfgengine.tables import SAMPLERS, coefficient_table

TABLE_RTOL = 1e-6  # one float32 rounding of float64 coefficients


def design_dpmpp_2m(lam: np.ndarray) -> np.ndarray:
    """Rows (α, σ, c_z, c_x, s, c_p): z_{t+1} = (σ_{t+1}/σ_t)·z_t + α_{t+1}·(1 − e^(−h_t))·D_t with
    h_t = (λ_{t+1} − λ_t)/2, D_t = x̂_t on t = 0 and t = T−2, else
    D_t = (1 + 1/(2r_t))·x̂_t − x̂_{t−1}/(2r_t), r_t = h_{t−1}/h_t."""
    steps = len(lam)
    alpha = np.sqrt(1 / (1 + np.exp(-lam)))
    sigma = np.sqrt(1 / (1 + np.exp(lam)))
    rows = []
    for t in range(steps - 1):
        h = (lam[t + 1] - lam[t]) / 2
        gain = alpha[t + 1] * (1 - math.exp(-h))
        if t == 0 or t == steps - 2:
            c_x, c_p = gain, 0.0
        else:
            r = ((lam[t] - lam[t - 1]) / 2) / h
            c_x, c_p = gain * (1 + 1 / (2 * r)), -gain / (2 * r)
        rows.append([alpha[t], sigma[t], sigma[t + 1] / sigma[t], c_x, 0.0, c_p])
    rows.append([alpha[-1], sigma[-1], 0.0, 1.0, 0.0, 0.0])
    return np.array(rows)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("steps", [2, 3, 4, 9, 32])
def test_dpmpp_2m_table_matches_the_update(grid, steps):
    table = coefficient_table(steps, "dpmpp_2m", grid=grid)
    ref = design_dpmpp_2m(logsnr_grid(steps, grid=grid).numpy())
    assert table.dtype == torch.float32 and tuple(table.shape) == (steps, 6)
    np.testing.assert_allclose(table.double().numpy(), ref, rtol=TABLE_RTOL, atol=1e-12)


def test_dpmpp_2m_first_order_steps_are_ddim_eta_zero():
    dpm, ddim = coefficient_table(12, "dpmpp_2m"), coefficient_table(12, "ddim", eta=0.0)
    for t in (0, 10, 11):
        torch.testing.assert_close(dpm[t], ddim[t], rtol=1e-6, atol=1e-9)
    assert bool((dpm[1:10, 5] < 0).all())  # second order in between: x̂_prev enters
    assert torch.equal(dpm[:, 2], ddim[:, 2])  # c_z = σ'/σ on every step


def test_dpmpp_2m_on_a_given_grid_uses_it_verbatim():
    lam = torch.tensor([-8.0, -5.0, -1.0, 0.0, 3.0, 10.0], dtype=torch.float64)
    ref = design_dpmpp_2m(lam.numpy())
    np.testing.assert_allclose(coefficient_table(None, "dpmpp_2m", logsnr=lam).double().numpy(),
                               ref, rtol=TABLE_RTOL, atol=1e-12)


@pytest.mark.parametrize("sampler", SAMPLERS[:3])  # the others' rows: tests/samplers/test_rows.py
def test_every_table_is_t_by_6_with_the_x_hat_last_row(sampler):
    table = coefficient_table(7, sampler, grid="karras")
    assert tuple(table.shape) == (7, 6)
    assert table[-1, 2:].tolist() == [0.0, 1.0, 0.0, 0.0]
    if sampler != "dpmpp_2m":
        assert bool((table[:, 5] == 0).all())
    if sampler != "ancestral":
        assert bool((table[:, 4] == 0).all())  # deterministic at η = 0 / always for 2M


def test_c_p_is_positive_zero_on_first_order_steps():
    """+0, not −0: a kernel that tests c_p ≠ 0 and one that tests its sign bit agree."""
    c_p = coefficient_table(6, "dpmpp_2m")[:, 5]
    assert not bool(torch.signbit(c_p[[0, 4, 5]]).any())
