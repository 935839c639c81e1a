"""The guided step in plain torch: the definition (kernels/contract.py states it), and the CPU path.

The rules (CFG with rescale, CFG-Zero*, APG) and thresholds (a number, DynamicThreshold) are the
configs in cfgengine.guidance; their math is here, once (docs/design.md, "Guidance rules"); the
Triton kernels (kernels/triton_step.py) compute the same in one or two passes over memory.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cfgengine import rng
from cfgengine.guidance import APG, CFG, DynamicThreshold, ZeroStar, guided_eps
from cfgengine.kernels.contract import (APG_NORM_FLOOR, ZERO_STAR_EPS, CounterNoise, RowState,
                                        refreshes, table_rows)

# ---------------------------------------------------------------------------------------------
# The torch reference: the definition. Per sample i, sums ⟨a, b⟩ run over all its D elements; std
# is unbiased. Memory traffic per step, in B·D values, that a fused implementation must move (the
# Triton path moves exactly this; S = storage dtype, F = fp32):
#   CFG()                read ε_c, ε_u, z; write z'                                        4 S
#   CFG(rescale > 0)     + reduction pass: read ε_c, ε_u (count, mean, M2 of ε_c and ε̃)   4+2 S
#   ZeroStar             + reduction pass: read ε_c, ε_u (⟨ε_c, ε_u⟩, ⟨ε_u, ε_u⟩)            4+2 S
#   APG, β ≠ 0           reduction pass: read ε_c, ε_u, z, m, write m (‖m‖², ⟨m, D_c⟩,
#                        ⟨D_c, D_c⟩); step pass: read ε_c, z, m, write z'            3+3 S, 3 F
#                        (β = 0 with a momentum: m is written, not read: 2 F; none at
#                        all: the step pass re-reads ε_u instead of m: 7 S)
#   clip = c             nothing (a clamp in registers)                                     +0
#   DynamicThreshold     the rule's first pass stops at x̂ and writes it (F), torch takes the
#                        per-sample quantile of |x̂| (|x̂| materialised, read, written, then two
#                        kthvalue selections of several passes each), the second pass reads
#                        x̂ (F) and z (S) again: +1 S +2 F and the quantile, ≈ +6 F or more
#   c_p ≠ 0 (dpmpp_2m)   read x̂_prev, write x̂ (both state.x_hat)                            +2
#   k x̂ kept (k = 2, 3)  read the k x̂, write them moved one back and x̂ (3M SDE, UniPC):    +2k
#                        the moves re-read x̂₁ (x̂₂) after z' is stored, from L2 while it stays
#   given noise          read n (rows with s ≠ 0 only)                                      +1 S
# The eager torch below materialises every intermediate; it is the definition, not the fast path.
# ---------------------------------------------------------------------------------------------


def guided_step_reference(eps2, z, w, table, step, *, rule=None, clip=None,
                          state: RowState | None = None,
                          noise: torch.Tensor | CounterNoise | None = None):
    """The step in plain torch, fp32 arithmetic; returns (z', x̂) in float32. Updates
    state.momentum in place on guided steps and reads the x̂ history; moving it and storing this
    step's x̂ (`RowState.push`) is the caller's (`guided_step` does it)."""
    state = RowState() if state is None else state
    bshape = (-1,) + (1,) * (z.dim() - 1)
    alpha, sigma, c_z, c_x, s, *c_ps = (c.reshape(bshape)
                                        for c in table_rows(table, step).unbind(1))
    x_hat = rule_x_hat(eps2, z, w, alpha, sigma, CFG() if rule is None else rule, state)
    x_hat = threshold(x_hat, clip)
    z_next = c_z * z.float() + c_x * x_hat
    for c_p, x_hat_prev in zip(c_ps, state.history()):
        z_next = z_next + previous_term(c_p, x_hat_prev)
    return z_next + s * drawn_noise(noise, z, step).float(), x_hat


def drawn_noise(noise: torch.Tensor | CounterNoise | None, z: torch.Tensor, step) -> torch.Tensor:
    """n for every row: the given tensor, or rng's draw at (seed, sample_ids[i], step_i + 1)."""
    if isinstance(noise, torch.Tensor):
        return noise
    counter = CounterNoise() if noise is None else noise
    ids = counter.sample_ids
    if ids is None:
        ids = torch.arange(z.shape[0], device=z.device)
    return rng.randn_like_rows(counter.seed, ids, step + 1, tuple(z.shape[1:]))


def data_prediction(z: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x̂ = (z − σ·ε)/α, the data prediction of ε at (α, σ) (paper §2)."""
    return (z - sigma * eps) / alpha


def rule_x_hat(eps2, z, w, alpha, sigma, rule, state: RowState) -> torch.Tensor:
    """x̂ before thresholding: the rule's ε̃ mapped to x̂, or APG's x̂; on B rows D_c, or under
    CFG(refresh) the data prediction of ε_c + w·Δ from the stored Δ (state.delta)."""
    batch = z.shape[0]
    z, eps_c = z.float(), eps2[:batch].float()
    w = torch.as_tensor(w, dtype=torch.float32, device=z.device).reshape(-1)
    if eps2.shape[0] == batch:
        if not refreshes(rule):
            return data_prediction(z, eps_c, alpha, sigma)
        return data_prediction(z, reused_eps(eps_c, state.delta, w), alpha, sigma)
    eps_u = eps2[batch:].float()
    if isinstance(rule, APG):
        return apg_x_hat(z, eps_c, eps_u, w.reshape((-1,) + (1,) * (z.dim() - 1)), alpha, sigma,
                         rule, state.momentum)
    if isinstance(rule, ZeroStar):
        eps = zero_star_eps(eps_c, eps_u, w)
    elif refreshes(rule):  # a refresh step: store Δ, then eq. 6 from it
        state.delta.copy_(eps_c - eps_u)
        eps = reused_eps(eps_c, state.delta, w)
    else:
        eps = rescaled_eps(eps_c, eps_u, w, rule.rescale)
    return data_prediction(z, eps, alpha, sigma)


def reused_eps(eps_c, delta, w) -> torch.Tensor:
    """Eq. 6 from a stored direction: ε_c + w·Δ, Δ = ε_c − ε_u (CFG(refresh), in eq. 6's
    rounding: on a refresh step it equals plain CFG's ε̃ exactly)."""
    return eps_c + w.reshape((-1,) + (1,) * (eps_c.dim() - 1)) * delta


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over every non-batch element, kept broadcastable: (B, 1, …, 1)."""
    return x.sum(dim=tuple(range(1, x.dim())), keepdim=True)


def rescaled_eps(eps_c, eps_u, w, rescale: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023 §3.4): φ·ε·std(ε_c)/std(ε) + (1 − φ)·ε on eq. 6's ε, written
    ε·(1 + φ·(r − 1)) so that a w = 0 row (r = 1 exactly) returns ε_c exactly."""
    eps = guided_eps(eps_c, eps_u, w)
    if rescale == 0.0:
        return eps
    dims = tuple(range(1, eps.dim()))
    ratio = eps_c.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True)
    return eps * (1.0 + rescale * (ratio - 1.0))


def zero_star_eps(eps_c, eps_u, w) -> torch.Tensor:
    """CFG-Zero* (Fan et al. 2025): s* = ⟨ε_c, ε_u⟩/(⟨ε_u, ε_u⟩ + 1e−8), then eq. 6 with s*·ε_u as
    the unconditional ε: ε_c + w·(ε_c − s*·ε_u) = s*·ε_u + (1 + w)·(ε_c − s*·ε_u)."""
    scale = _row_sum(eps_c * eps_u) / (_row_sum(eps_u * eps_u) + ZERO_STAR_EPS)
    return guided_eps(eps_c, scale * eps_u, w)


def apg_x_hat(z, eps_c, eps_u, w, alpha, sigma, rule: APG, momentum) -> torch.Tensor:
    """APG (Sadat et al. 2024) in x̂ space: Δ = D_c − D_u, m ← Δ + β·m (written back to `momentum`),
    Δ = m·min(1, r/‖m‖) when r > 0, x̂ = D_c + w·(Δ⊥ + η·Δ∥), Δ∥ = (⟨Δ, D_c⟩/⟨D_c, D_c⟩)·D_c."""
    d_c = data_prediction(z, eps_c, alpha, sigma)
    delta = d_c - data_prediction(z, eps_u, alpha, sigma)
    if rule.momentum != 0.0:
        delta = delta + rule.momentum * momentum
    if momentum is not None:
        momentum.copy_(delta)
    if rule.norm_threshold > 0.0:
        delta = delta * torch.clamp(rule.norm_threshold / _row_sum(delta * delta).sqrt(), max=1.0)
    dot = _row_sum(delta * d_c) / _row_sum(d_c * d_c).clamp(min=APG_NORM_FLOOR)
    parallel = dot * d_c
    return d_c + w * ((delta - parallel) + rule.eta * parallel)


def threshold(x_hat: torch.Tensor, clip: float | DynamicThreshold | None) -> torch.Tensor:
    """Static clipping to [−c, c], or Imagen's dynamic threshold (per sample), or nothing."""
    if clip is None:
        return x_hat
    if not isinstance(clip, DynamicThreshold):
        return x_hat.clamp(-clip, clip)
    scale = dynamic_threshold_scale(x_hat, clip).reshape((-1,) + (1,) * (x_hat.dim() - 1))
    return torch.clamp(x_hat, -scale, scale) / scale


def dynamic_threshold_scale(x_hat: torch.Tensor, clip: DynamicThreshold) -> torch.Tensor:
    """s = clamp(quantile(|x̂_i|, p), 1, max_value) per sample, float32 [B].

    The quantile is torch.quantile's "linear" one, computed the way it computes it (rank p·(n − 1)
    in float32, lerp of the two order statistics around it) but by two torch.kthvalue selections:
    torch.quantile refuses inputs over 2²⁴ elements and sorts; the ranks are host numbers (p and
    n are), so nothing waits on the device."""
    flat = x_hat.reshape(x_hat.shape[0], -1).abs()  # (B, D)
    rank = np.float32(clip.p) * np.float32(flat.shape[1] - 1)  # float32, as torch.quantile
    below = math.floor(rank)
    weight = float(rank - np.float32(below))
    lo = torch.kthvalue(flat, below + 1, dim=1).values
    hi = lo if weight == 0.0 else torch.kthvalue(flat, below + 2, dim=1).values
    return torch.lerp(lo, hi, weight).clamp(1.0, clip.max_value)


def previous_term(c_p: torch.Tensor, x_hat_prev: torch.Tensor | None) -> torch.Tensor:
    """c_p·x̂_prev where c_p ≠ 0 (the multistep samplers); x̂_prev is not read on rows with c_p = 0.
    A row that needs x̂_prev when none is given turns NaN (a device-side test, never a silent
    first-order step)."""
    if x_hat_prev is None:
        return torch.where(c_p != 0.0, float("nan"), 0.0)
    return torch.where(c_p != 0.0, c_p * x_hat_prev.float(), 0.0)

