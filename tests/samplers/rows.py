"""What a sampler's Rows mean, executed in float64: per row x̂ = (z − σ·ε)/α at the row's λ, then
z' = c_z·z + c_x·x̂ + Σ_k c_pk·x̂_(k rows back) + s·n with n the counter noise at the row's key,
the x̂ history kept in the ring of buffers `Rows.slots` names, this row's x̂ written over the
oldest after it was read."""
from __future__ import annotations

import torch

from cfgengine import rng
from cfgengine.samplers import C_P, Rows


def run_rows(rows: Rows, eps_fn, z: torch.Tensor, seed: int, ids: torch.Tensor) -> torch.Tensor:
    """The final z' (the sample x̂) of `rows` from z at the first row, eps_fn(z, λ) → ε."""
    z = z.double()
    buffers = [torch.full_like(z, float("nan")) for _ in range(rows.history)]
    for r, (alpha, sigma, c_z, c_x, s, *c_p) in enumerate(rows.table.tolist()):
        x_hat = (z - sigma * eps_fn(z, rows.logsnr[r:r + 1])) / alpha
        slots = rows.slots(r)
        z_next = c_z * z + c_x * x_hat
        for coef, slot in zip(c_p, slots):
            if coef:
                z_next = z_next + coef * buffers[slot]
        if s:
            key = rows.noise_keys[r]
            z_next = z_next + s * rng.randn_like_rows(seed, ids, key, tuple(z.shape[1:])).double()
        if slots:  # into the oldest x̂'s buffer, after it was read
            buffers[slots[-1]] = x_hat
        z = z_next
    return z


assert C_P == 5  # the table's history columns follow s (α, σ, c_z, c_x, s, c_p, c_p2, c_p3)
