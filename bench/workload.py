"""What every runner of one benchmark cell samples: the same net, device, precision, labels, w and
z_0 (docs/design.md §1 noise keys), on the same λ grid and coefficient table.

The model is the embedded default (`cfgengine.load("default")`) when it exists, else a randomly
initialised UNet of the named preset: timing does not depend on the weights.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from cfgengine import rng
from cfgengine.precision import autocast_dtype
from cfgengine.registry import load
from cfgengine.schedule import logsnr_grid
from cfgengine.tables import StepPlan, step_plan
from cfgengine.unet import UNet, preset

# Each sampler of the sweep with the settings that make it the step a diffusers scheduler takes:
# ancestral v = 0 is DDPM's "fixed small" posterior variance; DDIM with η = 0 is deterministic.
SAMPLER_ARGS = {"ancestral": dict(v=0.0), "ddim": dict(eta=0.0)}


@dataclass(frozen=True, eq=False)
class Workload:
    """One (precision, batch) of a sweep: B labels drawn once, the paper's w, the seed of z_0."""

    net: nn.Module
    device: torch.device
    precision: str
    labels: torch.Tensor  # (B,) in [0, K)
    w: float
    seed: int
    null: torch.Tensor = field(init=False)  # (B,) all K, the null label ∅

    def __post_init__(self):
        object.__setattr__(self, "null", torch.full_like(self.labels, self.net.num_classes))

    @property
    def batch(self) -> int:
        return self.labels.shape[0]

    def z0(self) -> torch.Tensor:
        """z_0 ~ N(0, I) at key (seed, i, 0): the engine's own start, shared by every runner."""
        ids = torch.arange(self.batch, device=self.device)
        return rng.randn_like_rows(self.seed, ids, 0, tuple(self.net.sample_shape))

    def autocast(self):
        """The network precision, as the Sampler applies it (the step stays fp32)."""
        dtype = autocast_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def make_workload(net: nn.Module, device: str, precision: str, batch: int, *, w: float,
                  seed: int) -> Workload:
    """A Workload of `batch` labels drawn with `seed` (so every run of a sweep draws the same)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, net.num_classes, (batch,), generator=gen)
    return Workload(net, torch.device(device), precision, labels.to(device), w, seed)


@functools.cache
def schedule(steps: int, sampler: str) -> StepPlan:
    """The step plan of the default grid, built as the Sampler builds it."""
    return step_plan(logsnr_grid(steps), sampler, **SAMPLER_ARGS[sampler])


def bench_model(name: str, device: str) -> tuple[nn.Module, str]:
    """(net on `device` in eval mode, where it came from). `default` is the embedded model when
    cfgengine.load("default") works, else UNet(preset("default")) with random weights (seed 0)."""
    if name == "default":
        try:
            return _frozen(load("default"), device), "cfgengine.load('default')"
        except (FileNotFoundError, ValueError, OSError) as err:
            why = f"cfgengine.load('default') unavailable: {err}"
    else:
        why = "named preset"
    return _frozen(random_unet(name), device), f"UNet(preset({name!r})), random weights ({why})"


def random_unet(name: str, seed: int = 0) -> UNet:
    """A UNet of preset `name` with seeded random weights everywhere — including the
    zero-initialised output layer, so ε is not identically zero and parity checks between runners mean something."""
    torch.manual_seed(seed)
    net = UNet(preset(name))
    nn.init.normal_(net.conv_out.weight, std=0.02)
    nn.init.normal_(net.conv_out.bias, std=0.02)
    return net


def _frozen(net: nn.Module, device: str) -> nn.Module:
    return net.to(device).eval().requires_grad_(False)
