"""The registry's host facts: options and their errors, rows per step, noise keys and quiet rows,
the x̂ history each sampler keeps, and DDIM η = 1 ≡ Euler ancestral η = 1 row for row."""
from __future__ import annotations

import math

import pytest
import torch

from cfgengine.samplers import C_P, C_P2, C_P3, NOISE, SAMPLERS, sampler_rows
from cfgengine.schedule import logsnr_grid

LAM = logsnr_grid(9, -14.0, 12.0, grid="karras")
STEPS = LAM.numel()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_rows_per_step_and_noise_keys(name):
    rows = sampler_rows(name, LAM)
    nfe = SAMPLERS[name].nfe
    assert rows.table.shape[0] == nfe * (STEPS - 1) + 1  # the step into σ = 0: one evaluation
    assert rows.steps == tuple(sorted(rows.steps)) and set(rows.steps) == set(range(STEPS))
    assert rows.noise_keys == tuple(range(1, rows.table.shape[0] + 1))  # the step's row + 1
    noisy = [r for r, quiet in enumerate(rows.quiet) if not quiet]
    assert len({rows.steps[r] for r in noisy}) == len(noisy)  # at most one draw per grid step
    if nfe == 2 and noisy:  # two-row samplers draw on a step's second row
        assert all(r % 2 == 1 for r in noisy)
    last = rows.table[-1, 2:].tolist()  # (c_z, c_x, s, c_p, …): z' = x̂
    assert rows.quiet[-1] and last == [0, 1, 0] + [0] * (len(last) - 3)
    assert torch.isfinite(rows.table).all()


@pytest.mark.parametrize("name, options, history", [
    ("ancestral", {}, 0), ("ddim", {}, 0), ("euler_ancestral", {}, 0), ("dpmpp_2m", {}, 1),
    ("heun", {}, 1), ("dpmpp_2s_ancestral", {}, 1), ("dpmpp_2m_sde", {}, 1),
    ("dpmpp_3m_sde", {}, 2), ("unipc", {"order": 2}, 2), ("unipc", {"order": 3}, 3),
])
def test_history_is_what_the_rows_read(name, options, history):
    rows = sampler_rows(name, LAM, **options)
    assert rows.history == history
    used = [col for col in (C_P, C_P2, C_P3)[: rows.table.shape[1] - C_P]
            if bool((rows.table[:, col] != 0).any())]
    assert len(used) == history


def test_state_names_the_history_and_the_table_its_columns():
    for name, options in [("ddim", {}), ("heun", {}), ("dpmpp_3m_sde", {}), ("unipc", {"order": 3})]:
        rows = sampler_rows(name, LAM, **options)
        assert rows.state == ("x_hat", "x_hat_2", "x_hat_3")[: rows.history]
        assert rows.table.shape[1] == 5 + max(1, rows.history)  # (…, c_p[, c_p2[, c_p3]])


def test_ddim_eta_1_is_euler_ancestral():
    ddim = sampler_rows("ddim", LAM, eta=1.0).table
    euler = sampler_rows("euler_ancestral", LAM).table
    assert torch.allclose(ddim, euler, rtol=1e-10, atol=1e-14)  # two float64 routes
    assert (ddim[:-1, NOISE] > 0).all()


def test_two_stage_rows_see_the_intermediate_logsnr():
    heun = sampler_rows("heun", LAM)
    assert heun.logsnr[1::2].tolist() == LAM[1:].tolist()  # Heun's second row: the next point
    deterministic = sampler_rows("dpmpp_2s_ancestral", LAM, eta=0.0).logsnr[1:-1:2]
    assert torch.allclose(deterministic, (LAM[:-1] + LAM[1:]) / 2)  # log σ's midpoint
    # η = 1: σ_down = σ'²/σ, so the midpoint √(σ·σ_down) is σ' itself
    assert torch.allclose(sampler_rows("dpmpp_2s_ancestral", LAM).logsnr[1:-1:2], LAM[1:])


@pytest.mark.parametrize("name, options, message", [
    ("euler", {}, "sampler must be one of"),
    ("heun", {"eta": 1.0}, "takes no option 'eta'"),
    ("unipc", {"order": 4}, "order must be one of"),
    ("dpmpp_2m_sde", {"solver": "rk4"}, "solver must be one of"),
    ("euler_ancestral", {"s_noise": -1.0}, "s_noise must be a number ≥ 0"),
    ("ddim", {"eta": 1.5}, "eta must be a number in [0, 1]"),
    ("dpmpp_3m_sde", {"eta": math.nan}, "eta must be a number ≥ 0"),
    ("unipc", {"order": True}, "order must be one of"),
])
def test_bad_options_fail_in_one_line(name, options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        sampler_rows(name, LAM, **options)
    assert "\n" not in str(info.value)


def test_none_takes_the_default():
    assert sampler_rows("unipc", LAM, order=None).history == 2
