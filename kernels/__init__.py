"""Fused sampling-step kernels (Triton) and their torch references."""
# TEMPORARY shim (house branch): the `kernels` branch provides the real RowState/CounterNoise API.
from __future__ import annotations

import dataclasses

import torch

from cfgengine.kernels.fused_step import guided_step as _old_step


@dataclasses.dataclass
class RowState:
    momentum: torch.Tensor | None = None
    x_hat: torch.Tensor | None = None

    def zero_(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                getattr(self, f.name).zero_()

    @classmethod
    def zeros_like(cls, z, names):
        return cls(**{n: torch.zeros_like(z, dtype=torch.float32) for n in names})


@dataclasses.dataclass
class CounterNoise:
    seed: object
    sample_ids: torch.Tensor


def guided_step(eps2, z, w, table, step, *, rule=None, clip=None, state=None, noise=None,
                out=None, impl="auto"):
    state = state or RowState()
    kw = {}
    if isinstance(noise, CounterNoise):
        kw = dict(seed=noise.seed, sample_ids=noise.sample_ids)
    elif noise is not None:
        kw = dict(noise=noise)
    if out is not None and out.shape[0] == 2 * z.shape[0]:
        kw["out2"] = out
    elif out is not None:
        kw["out"] = out
    return _old_step(eps2, z, w, table, step, rule=rule, clip=clip, state=state.momentum,
                     x_hat_prev=state.x_hat, x_hat_out=state.x_hat, impl=impl, **kw)


__all__ = ["guided_step", "RowState", "CounterNoise"]
