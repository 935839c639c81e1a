"""The λ grids (docs/design.md, "Grids") against their formulas written out here in numpy/math,
and the sampler's grid arguments: a given `logsnr` is used verbatim, the range default, the
model's own grid hook, one-line errors for bad settings."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import cfgengine
from cfgengine.model import info as model_info
from cfgengine.schedule import GRIDS, logsnr_grid
from cfgengine.tables import coefficient_table

RANGES = [(-20.0, 20.0), (-12.5, 7.0)]
STEPS = [2, 3, 8, 33]


def cosine_lam(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """λ(u) = −2·log tan(a·u + b), b = arctan e^(−hi/2), a = arctan e^(−lo/2) − b (paper §4)."""
    b = math.atan(math.exp(-hi / 2))
    a = math.atan(math.exp(-lo / 2)) - b
    return -2.0 * np.log(np.tan(a * u + b))


def formula_grid(grid: str, steps: int, lo: float, hi: float) -> np.ndarray:
    t = np.arange(steps, dtype=np.float64)
    if grid == "cosine":
        return cosine_lam(1 - t / (steps - 1), lo, hi)
    if grid == "cosine-authors":
        return cosine_lam(1 - t / steps, lo, hi)
    if grid == "uniform":
        return np.linspace(lo, hi, steps)
    rho = 7.0  # Karras et al. 2022 eq. 5 in σ = e^(−λ/2), from σmax = e^(−lo/2) down to σmin
    smax, smin = math.exp(-lo / 2), math.exp(-hi / 2)
    sig = (smax ** (1 / rho) + t / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return -2.0 * np.log(sig)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("lo, hi", RANGES)
def test_grid_matches_its_formula(grid, steps, lo, hi):
    lam = logsnr_grid(steps, lo, hi, grid=grid)
    assert lam.dtype == torch.float64 and lam.shape == (steps,)
    np.testing.assert_allclose(lam.numpy(), formula_grid(grid, steps, lo, hi), rtol=1e-12,
                               atol=1e-11)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("lo, hi", RANGES)
def test_grid_is_increasing_and_starts_at_lo(grid, lo, hi):
    lam = logsnr_grid(17, lo, hi, grid=grid)
    assert bool((lam[1:] > lam[:-1]).all())
    assert abs(lam[0].item() - lo) < 1e-9
    assert lam[-1].item() <= hi + 1e-9


@pytest.mark.parametrize("grid", ["cosine", "uniform", "karras"])
def test_grids_end_at_hi(grid):
    assert abs(logsnr_grid(9, -12.5, 7.0, grid=grid)[-1].item() - 7.0) < 1e-9


def test_cosine_authors_never_evaluates_at_hi_and_ends_at_u_one_over_t():
    lam = logsnr_grid(10, grid="cosine-authors")
    assert lam[-1].item() < 19.0
    assert abs(lam[-1].item() - cosine_lam(np.array([0.1]), -20, 20)[0]) < 1e-10


def test_default_grid_is_todays_cosine_bit_for_bit():
    steps = 12
    u = 1.0 - torch.arange(steps, dtype=torch.float64) / (steps - 1)
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    assert torch.equal(logsnr_grid(steps), -2.0 * torch.log(torch.tan(a * u + b)))


# --------------------------------------------------------------------------------------------
# The sampler's grid arguments.

class LogsnrRecorder:
    """A Denoiser wrapper recording the λ of every call (the net's view of the grid)."""

    def __init__(self, denoiser, **facts):
        self.inner = denoiser
        self.info = dataclasses.replace(model_info(denoiser), **facts)  # e.g. its own grid
        self.seen: list[torch.Tensor] = []

    def __call__(self, z, logsnr, labels):
        self.seen.append(logsnr.clone())
        return self.inner(z, logsnr, labels)

    def grid(self) -> torch.Tensor:
        assert all(bool((lam == lam[0]).all()) for lam in self.seen)
        return torch.stack([lam[0] for lam in self.seen])


LABELS = torch.tensor([0, 2, 4])


def test_given_logsnr_is_used_verbatim(gmm):
    lam = torch.tensor([-13.0, -4.25, -1.0, 0.5, 2.0, 6.0, 11.0], dtype=torch.float64)
    net = LogsnrRecorder(gmm)
    cfgengine.sample(net, LABELS, w=0.3, steps=None, logsnr=lam, sampler="ddim", seed=1)
    assert torch.equal(net.grid(), lam.float())
    table = coefficient_table(None, "ddim", logsnr=lam)
    alpha = torch.sigmoid(lam).sqrt().float()
    assert torch.equal(table[:, 0], alpha)


def test_logsnr_with_matching_steps_equals_steps_none(gmm):
    lam = logsnr_grid(6, grid="uniform", logsnr_min=-9.0, logsnr_max=9.0)
    given = cfgengine.sample(gmm, LABELS, steps=6, logsnr=lam, seed=3)
    assert torch.equal(given, cfgengine.sample(gmm, LABELS, steps=None, logsnr=lam, seed=3))
    named = cfgengine.sample(gmm, LABELS, steps=6, grid="uniform", logsnr_range=(-9, 9), seed=3)
    assert torch.equal(given, named)


def test_logsnr_range_defaults_to_the_models_attribute(gmm):
    net = LogsnrRecorder(gmm, logsnr_range=(-10.0, 8.0))
    cfgengine.sample(net, LABELS, steps=5, seed=1)
    assert torch.equal(net.grid(), logsnr_grid(5, -10.0, 8.0).float())
    plain = LogsnrRecorder(gmm)
    cfgengine.sample(plain, LABELS, steps=5, grid="karras", seed=1)
    assert torch.equal(plain.grid(), logsnr_grid(5, grid="karras").float())


def test_models_own_grid_is_used_unless_the_caller_chooses_one(gmm):
    own = torch.tensor([-9.0, -3.0, 0.0, 4.0, 9.5], dtype=torch.float64)
    asked: list[int] = []

    def model_grid(steps: int) -> torch.Tensor:
        asked.append(steps)
        return own[:steps]

    net = LogsnrRecorder(gmm, grid=model_grid)
    cfgengine.sample(net, LABELS, steps=5, seed=1)
    assert asked == [5] and torch.equal(net.grid(), own.float())
    net.seen.clear()
    cfgengine.sample(net, LABELS, steps=4, grid="uniform", seed=1)
    assert asked == [5] and torch.equal(net.grid(), logsnr_grid(4, grid="uniform").float())


BAD = [
    (dict(grid="linear"), "grid must be one of"),
    (dict(logsnr=torch.tensor([0.0, 1.0, 1.0])), "strictly increasing"),
    (dict(logsnr=torch.tensor([2.0, 1.0])), "strictly increasing"),
    (dict(logsnr=torch.tensor([0.0, math.nan])), "finite"),
    (dict(logsnr=torch.tensor([1, 2, 3])), "floating-point"),
    (dict(logsnr=torch.zeros(2, 2)), "1-D"),
    (dict(logsnr=torch.tensor([0.5])), "at least 2"),
    (dict(logsnr=torch.tensor([0.0, 1.0, 2.0]), steps=4), "logsnr holds 3"),
    (dict(steps=None), "steps must be given"),
    (dict(logsnr_range=(5.0, -5.0)), "lo < hi"),
    (dict(logsnr_range=(0.0, math.inf)), "finite"),
    (dict(logsnr_range=(1.0,)), "two numbers"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[m for _, m in BAD])
def test_bad_grid_settings_raise_one_line_before_sampling(gmm, recorder, kwargs, match):
    plain = recorder(gmm)
    with pytest.raises(ValueError, match=match) as err:
        cfgengine.sample(plain, LABELS, **{"steps": 6, **kwargs})
    assert "\n" not in str(err.value) and plain.calls == []
