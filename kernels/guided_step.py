"""The guided sampling step: guidance mix (paper eq. 6) + posterior update + noise, in one pass.

    ε̃  = (1 + w_i)·ε_c − w_i·ε_u          (rows 0..B−1 of eps2 are ε_c, rows B..2B−1 are ε_u)
    x̂  = clip((z − σ·ε̃)/α)
    z' = c_z·z + c_x·x̂ + s·n               (α, σ, c_z, c_x, s) = table[step_i]

This module holds the public `guided_step`, which dispatches between the torch reference (the
definition, and the CPU path) and the fused Triton kernel. An eps2 of B rows (instead of 2B) means
the guidance is already off (w = 0 everywhere, or unconditional sampling): ε̃ = eps2.
"""
from __future__ import annotations

import torch

from cfgengine import rng

IMPLS = ("auto", "triton", "torch")


def guided_step(eps2: torch.Tensor, z: torch.Tensor, w: float | torch.Tensor, table: torch.Tensor,
                step: int | torch.Tensor, *, clip: float | None = None,
                noise: torch.Tensor | None = None, seed: int | torch.Tensor = 0,
                sample_ids: torch.Tensor | None = None, out: torch.Tensor | None = None,
                x_hat_out: torch.Tensor | None = None, out2: torch.Tensor | None = None,
                impl: str = "auto") -> torch.Tensor:
    """One sampler step for B rows; returns z' (written into `out` when given).

    `step` is an int, a 0-d int64 tensor, or an int64 Tensor[B]; noise is `noise` when given, else
    drawn at key (seed, sample_ids[i], step_i + 1). `out2` [2B, *S] receives z' in both halves.
    """
    check_step_args(eps2, z, w, table, step, noise, out, x_hat_out, out2, impl)
    if sample_ids is None:
        sample_ids = torch.arange(z.shape[0], device=z.device)
    if _use_triton(impl, z):
        return guided_step_triton(eps2, z, w, table, step, clip=clip, noise=noise, seed=seed,
                                  sample_ids=sample_ids, out=out, x_hat_out=x_hat_out, out2=out2)
    z_next, x_hat = guided_step_reference(eps2, z, w, table, step, clip=clip, noise=noise,
                                          seed=seed, sample_ids=sample_ids)
    return _write_outputs(z_next, x_hat, z.dtype, out, x_hat_out, out2)


def _use_triton(impl: str, z: torch.Tensor) -> bool:
    if impl == "auto":
        return z.device.type == "cuda"
    return impl == "triton"


def table_rows(table: torch.Tensor, step: int | torch.Tensor, batch: int) -> torch.Tensor:
    """The coefficient rows for each of `batch` rows, float32 (B or 1, 5), without a host sync."""
    if isinstance(step, torch.Tensor):
        return table.index_select(0, step.reshape(-1).to(torch.int64))
    return table[step : step + 1]


def guided_step_reference(eps2, z, w, table, step, *, clip=None, noise=None, seed=0,
                          sample_ids=None):
    """The step in plain torch, fp32 arithmetic; returns (z', x̂) in float32.

    Memory traffic per element of z: reads ε_c, ε_u, z (+ n when given), writes z' — 4 (5) B·D values.
    """
    batch = z.shape[0]
    bshape = (-1,) + (1,) * (z.dim() - 1)
    alpha, sigma, c_z, c_x, s = table_rows(table, step, batch).unbind(dim=1)
    eps_c = eps2[:batch].float()
    if eps2.shape[0] == 2 * batch:
        w = torch.as_tensor(w, dtype=torch.float32, device=z.device).reshape(bshape)
        eps = eps_c + w * (eps_c - eps2[batch:].float())  # (1+w)·ε_c − w·ε_u
    else:
        eps = eps_c
    x_hat = (z.float() - sigma.reshape(bshape) * eps) / alpha.reshape(bshape)
    if clip is not None:
        x_hat = x_hat.clamp(-clip, clip)
    if noise is None:
        if sample_ids is None:
            sample_ids = torch.arange(batch, device=z.device)
        noise = rng.randn_like_rows(seed, sample_ids, step + 1, tuple(z.shape[1:]))
    z_next = c_z.reshape(bshape) * z.float() + c_x.reshape(bshape) * x_hat
    return z_next + s.reshape(bshape) * noise.float(), x_hat


def _write_outputs(z_next, x_hat, dtype, out, x_hat_out, out2):
    if x_hat_out is not None:
        x_hat_out.copy_(x_hat)
    if out is None:
        out = z_next.to(dtype)
    else:
        out.copy_(z_next)
    if out2 is not None:
        batch = out.shape[0]
        out2[:batch].copy_(out)
        out2[batch:].copy_(out)
    return out


def check_step_args(eps2, z, w, table, step, noise, out, x_hat_out, out2, impl) -> None:
    """Shape/dtype contract of `guided_step`; raises ValueError naming the first violation."""
    batch, sample_shape = z.shape[0], tuple(z.shape[1:])
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if eps2.shape[0] not in (batch, 2 * batch) or tuple(eps2.shape[1:]) != sample_shape:
        raise ValueError(f"eps2 must be [2B, *S] = [{2 * batch}, {sample_shape}] for z of shape "
                         f"{tuple(z.shape)}, got {tuple(eps2.shape)}")
    if table.dim() != 2 or table.shape[1] != 5 or table.dtype != torch.float32:
        raise ValueError(f"table must be float32 [T, 5], got {table.dtype} {tuple(table.shape)}")
    if isinstance(step, int) and not 0 <= step < table.shape[0]:
        raise ValueError(f"step {step} is outside the table's {table.shape[0]} rows")
    if isinstance(step, torch.Tensor) and step.numel() not in (1, batch):
        raise ValueError(f"step must be an int, a 0-d tensor or a Tensor[{batch}]")
    if isinstance(w, torch.Tensor) and w.numel() not in (1, batch):
        raise ValueError(f"w must be a float or a Tensor[{batch}], got shape {tuple(w.shape)}")
    for name, t, rows in (("noise", noise, batch), ("out", out, batch),
                          ("x_hat_out", x_hat_out, batch), ("out2", out2, 2 * batch)):
        if t is not None and (t.shape[0] != rows or tuple(t.shape[1:]) != sample_shape):
            raise ValueError(f"{name} must have shape [{rows}, {sample_shape}], "
                             f"got {tuple(t.shape)}")


def guided_step_triton(eps2, z, w, table, step, *, clip, noise, seed, sample_ids, out, x_hat_out,
                       out2):
    """Launcher of the fused Triton kernel (issue 4)."""
    raise NotImplementedError("the fused Triton step kernel is not written yet (issue 4)")
