"""What a sampler's Rows mean, executed in float64: per row x̂ = (z − σ·ε)/α at the row's λ, then
z' = c_z·z + c_x·x̂ + Σ_k c_pk·x̂_(k rows back) + s·n with n the counter noise at the row's key,
the x̂ history moved one row back after each row (as the step moves RowState's x_hat, x_hat_2,
x_hat_3)."""
from __future__ import annotations

import torch

from cfgengine import rng
from cfgengine.samplers import Rows


def run_rows(rows: Rows, eps_fn, z: torch.Tensor, seed: int, ids: torch.Tensor) -> torch.Tensor:
    """The final z' (the sample x̂) of `rows` from z at the first row, eps_fn(z, λ) → ε."""
    z = z.double()
    history = [torch.full_like(z, float("nan")) for _ in range(rows.history)]  # x̂ 1, 2, 3 back
    for r, (alpha, sigma, c_z, c_x, s, *c_p) in enumerate(rows.table.tolist()):
        x_hat = (z - sigma * eps_fn(z, rows.logsnr[r:r + 1])) / alpha
        z_next = c_z * z + c_x * x_hat
        for coef, x_prev in zip(c_p, history):
            if coef:
                z_next = z_next + coef * x_prev
        if s:
            key = rows.noise_keys[r]
            z_next = z_next + s * rng.randn_like_rows(seed, ids, key, tuple(z.shape[1:])).double()
        history = [x_hat] + history[:-1]
        z = z_next
    return z

