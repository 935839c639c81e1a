"""Flow-matching and EDM nets through cfgengine (cfgengine/families/flow.py) against each
parametrization's own Euler sampler, written here from its paper: the flow ODE
x_t' = x_t + (t' − t)·v (Lipman et al. 2023; SD3's FlowMatchEuler) and EDM's Euler step
x' = x + (σ' − σ)·(x − D)/σ (Karras et al. 2022, Alg. 1 without the 2nd-order correction)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cfgengine
from cfgengine import rng
from cfgengine.families.flow import EDM, FlowMatching
from cfgengine.tables import ALPHA, C_X, C_Z, SIGMA, table_from_logsnr

CLASSES, SHAPE, SEED = 3, (2, 4, 4), 5


class TinyNet(nn.Module):
    """A random class-conditional net of (x, time, cond): a conv, a time and a label embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(SHAPE[0], SHAPE[0], 3, padding=1)
        self.labels = nn.Embedding(CLASSES + 1, SHAPE[0])
        self.time = nn.Linear(1, SHAPE[0])

    def forward(self, x, time, cond):
        gain = 1 + 0.5 * torch.tanh(self.labels(cond) + self.time(time.float()[:, None]))
        return torch.tanh(self.conv(x)) * gain[:, :, None, None] + 0.1 * x


def guided(net, x, time, labels, w):
    """eq. 6 on the net's own output: f_u + (1 + w)·(f_c − f_u)."""
    scale = (1 + w).reshape(-1, 1, 1, 1)
    out_c = net(x, time, labels)
    out_u = net(x, time, torch.full_like(labels, CLASSES))
    return out_u + scale * (out_c - out_u)


def setting():
    labels = torch.tensor([0, 1, 2, 1])
    w = torch.tensor([0.0, 1.0, 2.5, 4.0])
    z0 = rng.randn_like_rows(SEED, torch.arange(4), 0, SHAPE)  # the engine's z at λ_0
    return labels, w, z0


def engine(model, labels, w, steps, sampler="ddim"):
    return cfgengine.sample(model, labels, w=w, steps=steps, sampler=sampler, seed=SEED,
                            backend="torch")


def rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("shift, time_scale", [(1.0, 1.0), (3.0, 1000.0)])
def test_flow_matching_is_the_flows_euler_sampler(shift, time_scale):
    net, steps = TinyNet().eval(), 7
    labels, w, x = setting()  # x_1 = ε: the flow starts from pure noise at t = 1
    t = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps  # 1 … 0
    t = shift * t / (1 + (shift - 1) * t)  # SD3's shifted sigmas
    with torch.no_grad():
        for i in range(steps):
            time = torch.full((4,), float(t[i]) * time_scale)
            x = x + float(t[i + 1] - t[i]) * guided(net, x, time, labels, w)
    model = FlowMatching(net, num_classes=CLASSES, sample_shape=SHAPE, shift=shift,
                         time_scale=time_scale)
    assert model.logsnr_grid(steps)[0] == -math.inf  # the first step is at α = 0
    out = engine(model, labels, w, steps)
    assert rel_err(out, x) < 1e-5, rel_err(out, x)


def test_flow_matching_is_diffusers_flow_match_euler():
    """With num_train_timesteps, the own grid is FlowMatchEulerDiscreteScheduler's (SD3's)."""
    diffusers = pytest.importorskip("diffusers")
    net, steps, shift = TinyNet().eval(), 6, 3.0
    labels, w, x = setting()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for time in scheduler.timesteps:
            v = guided(net, x, time.expand(4), labels, w)
            x = scheduler.step(v, time, x).prev_sample
    model = FlowMatching(net, num_classes=CLASSES, sample_shape=SHAPE, shift=shift,
                         time_scale=1000.0, num_train_timesteps=1000)
    out = engine(model, labels, w, steps)
    assert rel_err(out, x) < 1e-5, rel_err(out, x)


def karras_sigmas(steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    root_max, root_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(root_max + ramp * (root_min - root_max)) ** rho, torch.zeros(1)])


@pytest.mark.parametrize("sigma_data", [0.5, None])
def test_edm_is_edms_euler_sampler(sigma_data):
    net, steps = TinyNet().eval(), 8
    labels, w, z0 = setting()
    sigmas = karras_sigmas(steps)
    x = z0.double() * math.sqrt(1 + sigmas[0] ** 2)  # the engine's prior: unit variance in z

    def denoise(x, sigma):
        batch = torch.full((4,), sigma)
        if sigma_data is None:
            return guided(net, x.float(), batch, labels, w).double()
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / math.sqrt(sigma**2 + sigma_data**2)
        c_in = 1 / math.sqrt(sigma**2 + sigma_data**2)
        f = guided(net, (c_in * x).float(), torch.log(batch) / 4, labels, w)
        return c_skip * x + c_out * f.double()

    with torch.no_grad():
        for i in range(steps):
            sigma, nxt = float(sigmas[i]), float(sigmas[i + 1])
            x = x + (nxt - sigma) * (x - denoise(x, sigma)) / sigma
    model = EDM(net, num_classes=CLASSES, sample_shape=SHAPE, sigma_data=sigma_data)
    out = engine(model, labels, w, steps)
    assert rel_err(out, x) < 1e-4, rel_err(out, x)


def test_the_first_row_at_alpha_zero_reads_x_hat_from_the_net():
    lam = torch.tensor([-math.inf, -1.0, 2.0], dtype=torch.float64)
    for sampler in ("ancestral", "ddim", "dpmpp_2m"):
        table = table_from_logsnr(lam, sampler)
        assert torch.isfinite(table).all(), sampler
        assert (table[0, ALPHA], table[0, SIGMA]) == (1.0, 1.0)  # x̂ = z − (z − x̂)
        alpha_next = math.sqrt(1 / (1 + math.exp(1.0)))
        assert table[0, C_X] == pytest.approx(alpha_next)  # z' = σ'·ε + α'·x̂ from pure noise
    assert table_from_logsnr(lam, "ancestral")[0, C_Z] == 0.0


@pytest.mark.parametrize("sampler", ["ancestral", "dpmpp_2m"])
def test_the_grid_samplers_run_a_flow_model(sampler):
    model = FlowMatching(TinyNet().eval(), num_classes=CLASSES, sample_shape=SHAPE, shift=3.0)
    labels, w, _ = setting()
    out = engine(model, labels, w, 6, sampler)
    assert out.shape == (4, *SHAPE) and bool(torch.isfinite(out).all())


def test_a_sigma_space_sampler_refuses_alpha_zero_in_one_line():
    model = FlowMatching(TinyNet().eval(), num_classes=CLASSES, sample_shape=SHAPE)
    labels, w, _ = setting()
    with pytest.raises(ValueError, match="cannot start at λ = -inf"):
        engine(model, labels, w, 6, "heun")


def test_bad_settings_fail_in_one_line():
    with pytest.raises(ValueError, match="shift"):
        FlowMatching(TinyNet(), num_classes=CLASSES, sample_shape=SHAPE, shift=0.0)
    with pytest.raises(ValueError, match="sigma_range"):
        EDM(TinyNet(), num_classes=CLASSES, sample_shape=SHAPE, sigma_range=(1.0, 0.5))
