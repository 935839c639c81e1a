"""The cosine log-SNR schedule and the coefficient tables against DESIGN.md §1, formulas written
out independently here in float64 (numpy/math, not the package's helpers)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfgengine.schedule import (LOGSNR_MAX, LOGSNR_MIN, alpha_sigma, logsnr_grid,
                                logsnr_schedule)
from cfgengine.tables import coefficient_table

STEPS = [2, 3, 7, 16]
VS = [0.0, 0.3, 1.0]
ETAS = [0.0, 0.5, 1.0]
TABLE_RTOL = 1e-6  # float32 rounding of float64 coefficients (one rounding, values O(1))


def design_logsnr(u: np.ndarray) -> np.ndarray:
    b = math.atan(math.exp(-LOGSNR_MAX / 2))
    a = math.atan(math.exp(-LOGSNR_MIN / 2)) - b
    return -2.0 * np.log(np.tan(a * u + b))


def design_grid(steps: int) -> np.ndarray:
    return design_logsnr(1.0 - np.arange(steps, dtype=np.float64) / (steps - 1))


def design_alpha_sigma(lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


def design_ancestral(steps: int, v: float) -> np.ndarray:
    """Rows (α, σ, c_z, c_x, s, c_p = 0) from μ = r·(α'/α)·z + (1−r)·α'·x̂,
    var = ((1−r)σ'²)^(1−v)·((1−r)σ²)^v."""
    lam = design_grid(steps)
    alpha, sigma = design_alpha_sigma(lam)
    rows = []
    for t in range(steps - 1):
        r = math.exp(lam[t] - lam[t + 1])
        a1, s1 = alpha[t + 1], sigma[t + 1]
        var = ((1 - r) * s1**2) ** (1 - v) * ((1 - r) * sigma[t] ** 2) ** v
        rows.append([alpha[t], sigma[t], r * a1 / alpha[t], (1 - r) * a1, math.sqrt(var), 0.0])
    rows.append([alpha[-1], sigma[-1], 0.0, 1.0, 0.0, 0.0])
    return np.array(rows)


def design_ddim(steps: int, eta: float) -> np.ndarray:
    """Rows from s = η(σ'/σ)√(1−α²/α'²), c_z = √(σ'²−s²)/σ, c_x = α' − α·c_z; c_p = 0."""
    lam = design_grid(steps)
    alpha, sigma = design_alpha_sigma(lam)
    rows = []
    for t in range(steps - 1):
        a0, s0, a1, s1 = alpha[t], sigma[t], alpha[t + 1], sigma[t + 1]
        s = eta * (s1 / s0) * math.sqrt(1 - a0**2 / a1**2)
        c_z = math.sqrt(s1**2 - s**2) / s0
        rows.append([a0, s0, c_z, a1 - a0 * c_z, s, 0.0])
    rows.append([alpha[-1], sigma[-1], 0.0, 1.0, 0.0, 0.0])
    return np.array(rows)


def assert_table_close(table: torch.Tensor, ref: np.ndarray) -> None:
    assert table.dtype == torch.float32 and tuple(table.shape) == ref.shape
    np.testing.assert_allclose(table.double().numpy(), ref, rtol=TABLE_RTOL, atol=1e-12)


def test_logsnr_endpoints():
    lam = logsnr_schedule(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(lam, torch.tensor([20.0, -20.0], dtype=torch.float64),
                               rtol=0, atol=1e-9)


def test_logsnr_schedule_matches_design_formula():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    np.testing.assert_allclose(logsnr_schedule(u).numpy(), design_logsnr(u.numpy()), rtol=1e-12)


@pytest.mark.parametrize("steps", STEPS)
def test_grid_runs_from_min_to_max_strictly_increasing(steps):
    grid = logsnr_grid(steps)
    assert grid.shape == (steps,) and grid.dtype == torch.float64
    assert abs(grid[0].item() - LOGSNR_MIN) < 1e-9 and abs(grid[-1].item() - LOGSNR_MAX) < 1e-9
    assert bool((grid[1:] > grid[:-1]).all())
    np.testing.assert_allclose(grid.numpy(), design_grid(steps), rtol=1e-12, atol=1e-12)


def test_grid_dtype_argument_rounds_once():
    assert torch.equal(logsnr_grid(9, dtype=torch.float32), logsnr_grid(9).float())


def test_alpha_sigma_unit_norm_and_sigmoid_relations():
    lam = torch.linspace(-20, 20, 41, dtype=torch.float64)
    alpha, sigma = alpha_sigma(lam)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(lam), rtol=0, atol=1e-14)
    torch.testing.assert_close(alpha**2, torch.sigmoid(lam), rtol=1e-14, atol=0)
    torch.testing.assert_close(sigma**2, torch.sigmoid(-lam), rtol=1e-14, atol=0)
    torch.testing.assert_close(torch.log(alpha**2 / sigma**2), lam, rtol=0, atol=1e-9)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("v", VS)
def test_ancestral_table_matches_design_formulas(steps, v):
    assert_table_close(coefficient_table(steps, "ancestral", v=v), design_ancestral(steps, v))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("eta", ETAS)
def test_ddim_table_matches_design_formulas(steps, eta):
    assert_table_close(coefficient_table(steps, "ddim", eta=eta), design_ddim(steps, eta))


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpmpp_2m"])
def test_last_row_returns_x_hat(sampler):
    table = coefficient_table(5, sampler, v=0.3, eta=0.5)
    alpha, sigma = design_alpha_sigma(np.array([LOGSNR_MAX]))
    np.testing.assert_allclose(table[-1].double().numpy(),
                               [alpha[0], sigma[0], 0.0, 1.0, 0.0, 0.0], rtol=TABLE_RTOL, atol=0)


@pytest.mark.parametrize("steps", STEPS)
def test_ddim_eta_one_equals_ancestral_v_zero(steps):
    torch.testing.assert_close(coefficient_table(steps, "ddim", eta=1.0),
                               coefficient_table(steps, "ancestral", v=0.0), rtol=1e-5, atol=1e-7)


def test_deterministic_ddim_has_no_noise_and_ancestral_has():
    assert torch.equal(coefficient_table(8, "ddim", eta=0.0)[:, 4], torch.zeros(8))
    assert bool((coefficient_table(8, "ancestral", v=0.3)[:-1, 4] > 0).all())


def test_table_is_built_on_requested_device():
    assert coefficient_table(4, device="meta").device.type == "meta"


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=1), "steps"),
    (dict(steps=0), "steps"),
    (dict(steps=-3), "steps"),
    (dict(steps=4.0), "steps"),
    (dict(steps=True), "steps"),
    (dict(steps=8, v=-0.1), "v"),
    (dict(steps=8, v=1.5), "v"),
    (dict(steps=8, v=math.nan), "v"),
    (dict(steps=8, eta=-1.0), "eta"),
    (dict(steps=8, eta=1.01), "eta"),
    (dict(steps=8, eta=math.nan), "eta"),
    (dict(steps=8, eta=math.inf), "eta"),
    (dict(steps=8, sampler="euler"), "sampler"),
])
def test_coefficient_table_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        coefficient_table(**kwargs)


@pytest.mark.parametrize("steps", [0, 1])
def test_logsnr_grid_rejects_too_few_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        logsnr_grid(steps)
