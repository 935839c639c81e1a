"""The guided sampling step: guidance rule + thresholding + posterior update + noise, fused.

    ε̃  = rule(ε_c, ε_u, w_i)             (rows 0..B−1 of eps2 are ε_c, rows B..2B−1 are ε_u)
    x̂  = threshold((z − σ·ε̃)/α)          (APG forms x̂ directly in x̂ space)
    z' = c_z·z + c_x·x̂ + c_p·x̂_prev + s·n   (α, σ, c_z, c_x, s, c_p) = table[step_i]

The rules (CFG with rescale, CFG-Zero*, APG) and thresholds (a number, DynamicThreshold) are the
configs in cfgengine.guidance; their math is here, once (docs/design.md, "Guidance rules"). This
module holds, in layers (docs/design.md §5): the torch reference `guided_step_reference` (the
definition, and the CPU path); the private Triton kernels; their launcher `guided_step_triton`,
which checks the operands and picks the tile; and the public `guided_step`, which dispatches. An
eps2 of B rows (instead of 2B) means the guidance is off at this step (w = 0 everywhere,
unconditional sampling, or a step outside the rule's interval): ε̃ = ε_c whatever the rule, and
APG's momentum is left as it is.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch

from cfgengine import rng
from cfgengine.guidance import APG, CFG, RULES, DynamicThreshold, ZeroStar, guided_eps

try:  # Triton ships for Linux x86-64 only; elsewhere the torch path still works.
    import triton
    import triton.language as tl
    from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float
except ImportError:
    triton = tl = None

IMPLS = ("auto", "triton", "torch")
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TABLE_COLUMNS = 6  # (α, σ, c_z, c_x, s, c_p)
ZERO_STAR_EPS = 1e-8  # CFG-Zero*'s guard on ⟨ε_u, ε_u⟩ (diffusers `cfg_zero_star_scale`)
APG_NORM_FLOOR = 1e-24  # ⟨D_c, D_c⟩ floor: torch's normalize clamps ‖D_c‖ at 1e-12
# triton.jit picks the interpreter when it decorates, so this is read once, at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def guided_step(eps2: torch.Tensor, z: torch.Tensor, w: float | torch.Tensor, table: torch.Tensor,
                step: int | torch.Tensor, *, rule: CFG | ZeroStar | APG | None = None,
                state: torch.Tensor | None = None, x_hat_prev: torch.Tensor | None = None,
                clip: float | DynamicThreshold | None = None, noise: torch.Tensor | None = None,
                seed: int | torch.Tensor = 0, sample_ids: torch.Tensor | None = None,
                out: torch.Tensor | None = None, x_hat_out: torch.Tensor | None = None,
                out2: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """One sampler step for B rows; returns z' (written into `out` when given).

    `rule` defaults to CFG(); `state` is APG's fp32 momentum [B, *S], updated in place on guided
    steps; `x_hat_prev` is the previous step's x̂, read where c_p ≠ 0; `x_hat_out` receives this
    step's final x̂ and may alias `x_hat_prev`. `step` is an int, a 0-d int64 tensor, or an int64
    Tensor[B]; noise is `noise` when given, else drawn at key (seed, sample_ids[i], step_i + 1).
    `out2` [2B, *S] receives z' in both halves; without `out`, the returned z' is the view
    out2[:B] (no third write). The rule's `interval` is the caller's to apply: outside it the
    Sampler passes eps2 with B rows (ε̃ = ε_c); the step applies the rule whenever it gets 2B.
    """
    rule = CFG() if rule is None else rule
    check_step_args(eps2, z, w, table, step, noise, out, x_hat_out, out2, impl, rule=rule,
                    state=state, x_hat_prev=x_hat_prev, clip=clip)
    if _use_triton(impl, z):
        _require_triton(z.device)
        check_kernel_operands(eps2, z, w, table, step, noise, seed, sample_ids, out, x_hat_out,
                              out2, state=state, x_hat_prev=x_hat_prev)
        return _launch(StepOperands(eps2, z, w, table, step, rule, state, x_hat_prev, clip, noise,
                                    seed, sample_ids, out, x_hat_out, out2), None)
    z_next, x_hat = guided_step_reference(eps2, z, w, table, step, rule=rule, state=state,
                                          x_hat_prev=x_hat_prev, clip=clip, noise=noise,
                                          seed=seed, sample_ids=sample_ids)
    return _write_outputs(z_next, x_hat, z.dtype, out, x_hat_out, out2)


def _use_triton(impl: str, z: torch.Tensor) -> bool:
    """impl "auto" takes the kernel on CUDA when Triton is installed; "triton" insists on it.

    On CPU "auto" stays the eager reference, measured against torch.compile of it
    (bench/results/step-cpu-*.json): compiled, a step runs 6–30× faster, but each dtype, shape
    and flag set compiles for 20–40 s (cold cache), which a CPU run earns back only after
    hundreds of steps of megabytes each — and every short run and test would pay it. A caller
    holding state across runs (the Sampler) is the place to opt into compiling.
    """
    if impl == "auto":
        return z.device.type == "cuda" and triton is not None
    if impl == "triton":
        _require_triton(z.device)
    return impl == "triton"


def _require_triton(device: torch.device) -> None:
    """Raise a RuntimeError that says how to run the kernel when it cannot run here."""
    if triton is None:
        raise RuntimeError("impl='triton' needs the `triton` package (Linux x86-64); "
                           "use impl='torch' or impl='auto'")
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"impl='triton' on {device.type} tensors needs TRITON_INTERPRET=1 "
                           "set before cfgengine.kernels is imported")


def table_rows(table: torch.Tensor, step: int | torch.Tensor, batch: int) -> torch.Tensor:
    """The coefficient rows for each of `batch` rows, float32 (B or 1, 6), without a host sync."""
    if isinstance(step, torch.Tensor):
        return table.index_select(0, step.reshape(-1).to(torch.int64))
    return table[step : step + 1]


# ---------------------------------------------------------------------------------------------
# The torch reference: the definition. Per sample i, sums ⟨a, b⟩ run over all its D elements; std
# is unbiased. Memory traffic per step, in B·D values, that a fused implementation must move (the
# Triton path below moves exactly this; S = storage dtype, F = fp32):
#   CFG()                read ε_c, ε_u, z; write z'                                        4 S
#   CFG(rescale > 0)     + reduction pass: read ε_c, ε_u (count, mean, M2 of ε_c and ε̃)   4+2 S
#   ZeroStar             + reduction pass: read ε_c, ε_u (⟨ε_c, ε_u⟩, ⟨ε_u, ε_u⟩)            4+2 S
#   APG, β ≠ 0           reduction pass: read ε_c, ε_u, z, m, write m (‖m‖², ⟨m, D_c⟩,
#                        ⟨D_c, D_c⟩); step pass: read ε_c, z, m, write z'            3+3 S, 3 F
#                        (β = 0 with a state: m is written, not read: 2 F; no state at
#                        all: the step pass re-reads ε_u instead of m: 7 S)
#   clip = c             nothing (a clamp in registers)                                     +0
#   DynamicThreshold     the rule's first pass stops at x̂ and writes it (F), torch takes the
#                        per-sample quantile of |x̂| (|x̂| materialised, read, written, then two
#                        kthvalue selections of several passes each), the second pass reads
#                        x̂ (F) and z (S) again: +1 S +2 F and the quantile, ≈ +6 F or more
#   c_p ≠ 0 (dpmpp_2m)   read x̂_prev, write x̂ (x_hat_out, may alias x_hat_prev)              +2
#   given noise          read n (rows with s ≠ 0 only)                                      +1 S
# The eager torch below materialises every intermediate; it is the definition, not the fast path.
# ---------------------------------------------------------------------------------------------


def guided_step_reference(eps2, z, w, table, step, *, rule=None, state=None, x_hat_prev=None,
                          clip=None, noise=None, seed=0, sample_ids=None):
    """The step in plain torch, fp32 arithmetic; returns (z', x̂) in float32. Updates `state`
    (APG's momentum) in place on guided steps."""
    batch = z.shape[0]
    bshape = (-1,) + (1,) * (z.dim() - 1)
    alpha, sigma, c_z, c_x, s, c_p = (c.reshape(bshape)
                                      for c in table_rows(table, step, batch).unbind(dim=1))
    x_hat = rule_x_hat(eps2, z, w, alpha, sigma, CFG() if rule is None else rule, state)
    x_hat = threshold(x_hat, clip)
    if noise is None:
        if sample_ids is None:
            sample_ids = torch.arange(batch, device=z.device)
        noise = rng.randn_like_rows(seed, sample_ids, step + 1, tuple(z.shape[1:]))
    z_next = c_z * z.float() + c_x * x_hat + previous_term(c_p, x_hat_prev)
    return z_next + s * noise.float(), x_hat


def data_prediction(z: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x̂ = (z − σ·ε)/α, the data prediction of ε at (α, σ) (paper §2)."""
    return (z - sigma * eps) / alpha


def rule_x_hat(eps2, z, w, alpha, sigma, rule, state) -> torch.Tensor:
    """x̂ before thresholding: the rule's ε̃ mapped to x̂, or APG's x̂; D_c when eps2 has B rows."""
    batch = z.shape[0]
    z, eps_c = z.float(), eps2[:batch].float()
    if eps2.shape[0] == batch:
        return data_prediction(z, eps_c, alpha, sigma)
    eps_u = eps2[batch:].float()
    w = torch.as_tensor(w, dtype=torch.float32, device=z.device).reshape(-1)
    if isinstance(rule, APG):
        return apg_x_hat(z, eps_c, eps_u, w.reshape((-1,) + (1,) * (z.dim() - 1)), alpha, sigma,
                         rule, state)
    if isinstance(rule, ZeroStar):
        eps = zero_star_eps(eps_c, eps_u, w)
    else:
        eps = rescaled_eps(eps_c, eps_u, w, rule.rescale)
    return data_prediction(z, eps, alpha, sigma)


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


def apg_x_hat(z, eps_c, eps_u, w, alpha, sigma, rule: APG, state) -> torch.Tensor:
    """APG (Sadat et al. 2024) in x̂ space: Δ = D_c − D_u, m ← Δ + β·m (written back to `state`),
    Δ = m·min(1, r/‖m‖) when r > 0, x̂ = D_c + w·(Δ⊥ + η·Δ∥), Δ∥ = (⟨Δ, D_c⟩/⟨D_c, D_c⟩)·D_c."""
    d_c = data_prediction(z, eps_c, alpha, sigma)
    delta = d_c - data_prediction(z, eps_u, alpha, sigma)
    if rule.momentum != 0.0:
        delta = delta + rule.momentum * state
    if state is not None:
        state.copy_(delta)
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
    """c_p·x̂_prev where c_p ≠ 0 (DPM-Solver++(2M)); x̂_prev is not read on rows with c_p = 0.
    A row that needs x̂_prev when none is given turns NaN (a device-side test, never a silent
    first-order step)."""
    if x_hat_prev is None:
        return torch.where(c_p != 0.0, float("nan"), 0.0)
    return torch.where(c_p != 0.0, c_p * x_hat_prev.float(), 0.0)


def _write_outputs(z_next, x_hat, dtype, out, x_hat_out, out2):
    """Store the reference's fp32 results the way the kernel does: rounded once per destination."""
    if x_hat_out is not None:
        x_hat_out.copy_(x_hat)
    if out is None and out2 is None:
        return z_next.to(dtype)
    if out is None:
        out = out2[: z_next.shape[0]]
    for dest in _destinations(out, out2):
        dest.copy_(z_next)
    return out


def _destinations(out: torch.Tensor, out2: torch.Tensor | None) -> list[torch.Tensor]:
    """Every tensor z' goes to: `out`, then each half of `out2` that is not `out` itself."""
    if out2 is None:
        return [out]
    halves = out2.chunk(2)
    return [out] + [half for half in halves if half.data_ptr() != out.data_ptr()]


def check_step_args(eps2, z, w, table, step, noise, out, x_hat_out, out2, impl, *, rule=None,
                    state=None, x_hat_prev=None, clip=None) -> None:
    """Shape/dtype contract of `guided_step`; raises ValueError naming the first violation."""
    batch, sample_shape = z.shape[0], tuple(z.shape[1:])
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if eps2.shape[0] not in (batch, 2 * batch) or tuple(eps2.shape[1:]) != sample_shape:
        raise ValueError(f"eps2 must be [2B, *S] = [{2 * batch}, {sample_shape}] for z of shape "
                         f"{tuple(z.shape)}, got {tuple(eps2.shape)}")
    if table.dim() != 2 or table.shape[1] != TABLE_COLUMNS or table.dtype != torch.float32:
        raise ValueError(f"table must be float32 [T, {TABLE_COLUMNS}] (α, σ, c_z, c_x, s, c_p), "
                         f"got {table.dtype} {tuple(table.shape)}")
    if isinstance(step, int) and not 0 <= step < table.shape[0]:
        raise ValueError(f"step {step} is outside the table's {table.shape[0]} rows")
    if isinstance(step, torch.Tensor) and step.numel() not in (1, batch):
        raise ValueError(f"step must be an int, a 0-d tensor or a Tensor[{batch}]")
    if isinstance(w, torch.Tensor) and w.numel() not in (1, batch):
        raise ValueError(f"w must be a float or a Tensor[{batch}], got shape {tuple(w.shape)}")
    for name, t, rows in (("noise", noise, batch), ("out", out, batch),
                          ("x_hat_out", x_hat_out, batch), ("out2", out2, 2 * batch),
                          ("state", state, batch), ("x_hat_prev", x_hat_prev, batch)):
        if t is not None and (t.shape[0] != rows or tuple(t.shape[1:]) != sample_shape):
            raise ValueError(f"{name} must have shape [{rows}, {sample_shape}], "
                             f"got {tuple(t.shape)}")
    check_rule_args(rule, state, clip)


def check_rule_args(rule, state, clip) -> None:
    """The rule is one of cfgengine.guidance's; APG with momentum has an fp32 `state`; `clip` is
    None, a positive number or a DynamicThreshold."""
    if rule is not None and not isinstance(rule, RULES):
        raise ValueError(f"rule must be one of {', '.join(r.__name__ for r in RULES)}, "
                         f"got {rule!r}")
    if isinstance(rule, APG) and rule.momentum != 0.0 and state is None:
        raise ValueError("APG with momentum needs state= (an fp32 [B, *S] buffer, zeros at first)")
    if state is not None and state.dtype != torch.float32:
        raise ValueError(f"state must be float32, got {state.dtype}")
    number = isinstance(clip, (int, float)) and not isinstance(clip, bool)
    if not (clip is None or isinstance(clip, DynamicThreshold)
            or (number and math.isfinite(clip) and clip > 0)):
        raise ValueError(f"clip must be None, a positive number or a DynamicThreshold, "
                         f"got {clip!r}")


# ---------------------------------------------------------------------------------------------
# The fused kernels. At most two passes over memory per step (three launches with
# DynamicThreshold, whose quantile torch computes in between):
#
#   _row_stats_kernel   (rescale, ZeroStar, APG only) grid (SPLIT, row blocks): program (k, rows)
#                       reduces its k-th contiguous slice of each row to a few fp32 partials
#                       stats[i, :, k] — rescale: count and (mean, M2) of ε_c and of eq. 6's ε
#                       (Chan's pairwise merge, no cancellation); ZeroStar: ⟨ε_c, ε_u⟩, ⟨ε_u, ε_u⟩;
#                       APG: ‖m‖², ⟨m, D_c⟩, ⟨D_c, D_c⟩ after m ← (D_c − D_u) + β·m, which it
#                       writes.
#                       Slices, not atomics: the sums are deterministic and row i reads row i only.
#   _guided_step_kernel grid (blocks of D, row blocks); one program owns BLOCK_R rows × BLOCK_D
#                       elements and computes, in fp32 from any storage dtype, rounding once per
#                       store:
#     (α, σ, c_z, c_x, s, c_p) = table[step_i]                (NaN α when step_i is off the table)
#     ε̃  = ε_c + w_i·(ε_c − ε_u)                   CFG (eq. 6, in the reference's rounding)
#        · (1 + φ·(std(ε_c)/std(ε̃) − 1))           CFG(rescale = φ), from the SPLIT partials
#     ε̃  = ε_c + w_i·(ε_c − s*·ε_u), s* = ⟨ε_c, ε_u⟩/(⟨ε_u, ε_u⟩ + 1e−8)    ZeroStar
#     x̂  = (z − σ·ε̃)/α, or for APG x̂ = D_c + w_i·(Δ⊥ + η·Δ∥), Δ = m·min(1, r/‖m‖)
#     x̂  = clamp(x̂, −c, c), or clamp(x̂, −s_i, s_i)/s_i with s_i DynamicThreshold's scale
#     z' = c_z·z + c_x·x̂ + c_p·x̂_prev + s·n,  n = noise[i, j], or output j % 4 of Philox4x32-10
#          keyed by `seed` at counter (j // 4, step_i + 1, id_i low, id_i high) (rng.py)
#   ε̃ = ε_c (x̂ = D_c) when GUIDED is off (eps2 has B rows). Rows whose s is 0 read no noise and
#   draw none; rows whose c_p is 0 read no x̂_prev. Traffic: the table above the reference.
# ---------------------------------------------------------------------------------------------

RULE_PLAIN, RULE_RESCALE, RULE_ZERO_STAR, RULE_APG = range(4)
STAT_SLOTS = 5  # partials per row and slice: rescale's (n, mean_c, M2_c, mean, M2) is the most
THRESHOLD_NONE, THRESHOLD_CLIP, THRESHOLD_SCALE = range(3)


def _jit(**options):
    """triton.jit where Triton exists; elsewhere the function stays plain and is never launched."""
    return (lambda fn: triton.jit(fn, **options)) if triton is not None else (lambda fn: fn)


@_jit()
def _per_row(ptr, value, rows, row_mask, MODE: tl.constexpr, DTYPE: tl.constexpr):
    """A per-row operand as (BLOCK_R,) DTYPE: MODE 0 the scalar `value`, 1 the single value at
    `ptr` (a 0-d device tensor, read by every row), 2 `ptr[row]`."""
    if MODE == 0:
        x = value + tl.zeros(rows.shape, DTYPE)
    else:
        x = tl.load(ptr + rows * (MODE - 1), mask=row_mask, other=0).to(DTYPE)
    return x


@_jit()
def _table_column(table_ptr, step, table_len, row_mask, column: tl.constexpr, missing):
    """table[step_i, column] of the [T, 6] table for each row as (BLOCK_R, 1) fp32; `missing`
    off the table."""
    valid = row_mask & (step >= 0) & (step < table_len)
    return tl.load(table_ptr + step * 6 + column, mask=valid, other=missing)[:, None]


@_jit()
def _tile(rows, row_mask, cols, numel):
    """(mask, int64 offsets) of the tile rows × cols of a [B, numel] tensor: int64 because B·D
    may pass 2³¹."""
    mask = row_mask[:, None] & (cols < numel)[None, :]
    return mask, rows.to(tl.int64)[:, None] * numel + cols[None, :]


@_jit()
def _data_prediction(z, eps_ptr, offs, mask, alpha, sigma):
    """x̂ = (z − σ·ε)/α with ε loaded from `eps_ptr`."""
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (z - sigma * eps) / alpha


@_jit()
def _partials(stats_ptr, rows, row_mask, slot: tl.constexpr, SPLIT: tl.constexpr):
    """The SPLIT partials of one statistic for each row, (BLOCK_R, SPLIT) fp32."""
    first = (rows.to(tl.int64) * 5 + slot)[:, None] * SPLIT  # stats[row, slot, 0]; 5 slots
    ptrs = stats_ptr + first + tl.arange(0, SPLIT)[None, :]
    return tl.load(ptrs, mask=row_mask[:, None], other=1.0)  # 1: no 0/0 on rows past the batch


@_jit()
def _row_total(stats_ptr, rows, row_mask, slot: tl.constexpr, SPLIT: tl.constexpr):
    """Σ of one statistic's partials: (BLOCK_R, 1)."""
    return tl.sum(_partials(stats_ptr, rows, row_mask, slot, SPLIT), axis=1)[:, None]


@_jit()
def _row_std(stats_ptr, rows, row_mask, mean_slot: tl.constexpr, SPLIT: tl.constexpr):
    """Unbiased std of each row from its slices' (count, mean, M2), Chan et al.'s merge:
    (BLOCK_R, 1)."""
    count = _partials(stats_ptr, rows, row_mask, 0, SPLIT)
    mean = _partials(stats_ptr, rows, row_mask, mean_slot, SPLIT)
    n = tl.where(row_mask, tl.sum(count, axis=1), 2.0)  # rows past the batch: no 0/0
    row_mean = tl.sum(count * mean, axis=1) / n
    spread = mean - row_mean[:, None]
    m2 = tl.sum(_partials(stats_ptr, rows, row_mask, mean_slot + 1, SPLIT), axis=1)
    return tl.sqrt((m2 + tl.sum(count * spread * spread, axis=1)) / (n - 1.0))[:, None]


@_jit()
def _rule_eps(eps_c, eps_u_ptr, offs, mask, w, rows, row_mask, stats_ptr, rescale,
              RULE: tl.constexpr, SPLIT: tl.constexpr):
    """ε̃ of CFG, CFG(rescale) or ZeroStar (formula above) from the loaded ε_c."""
    eps_u = tl.load(eps_u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RULE == 2:  # ZeroStar: s*·ε_u stands in for ε_u
        scale = _row_total(stats_ptr, rows, row_mask, 0, SPLIT) / (
            _row_total(stats_ptr, rows, row_mask, 1, SPLIT) + 1e-8)
        eps_u = scale * eps_u
    eps = eps_c + w * (eps_c - eps_u)
    if RULE == 1:
        ratio = _row_std(stats_ptr, rows, row_mask, 1, SPLIT) / _row_std(stats_ptr, rows, row_mask,
                                                                           3, SPLIT)
        eps = eps * (1.0 + rescale * (ratio - 1.0))
    return eps


@_jit()
def _apg_x_hat(d_c, z, eps_u_ptr, state_ptr, offs, mask, alpha, sigma, w, rows, row_mask,
               stats_ptr, apg_eta, apg_norm, HAS_STATE: tl.constexpr, SPLIT: tl.constexpr):
    """APG's x̂ = D_c + w·(Δ⊥ + η·Δ∥) from the momentum m (the state the stats pass wrote, or
    D_c − D_u when there is none) and the row's ‖m‖², ⟨m, D_c⟩, ⟨D_c, D_c⟩."""
    if HAS_STATE:
        m = tl.load(state_ptr + offs, mask=mask, other=0.0)
    else:
        m = d_c - _data_prediction(z, eps_u_ptr, offs, mask, alpha, sigma)
    norm = tl.sqrt(_row_total(stats_ptr, rows, row_mask, 0, SPLIT))
    shrink = tl.where(apg_norm > 0.0, tl.minimum(apg_norm / norm, 1.0), 1.0)
    dot = shrink * _row_total(stats_ptr, rows, row_mask, 1, SPLIT) / tl.maximum(
        _row_total(stats_ptr, rows, row_mask, 2, SPLIT), 1e-24)
    delta = shrink * m
    parallel = dot * d_c
    return d_c + w * ((delta - parallel) + apg_eta * parallel)


@_jit()
def _rule_x_hat(eps_c_ptr, eps_u_ptr, state_ptr, stats_ptr, offs, mask, z, alpha, sigma, w, rows,
                row_mask, rescale, apg_eta, apg_norm, GUIDED: tl.constexpr, RULE: tl.constexpr,
                HAS_STATE: tl.constexpr, SPLIT: tl.constexpr):
    """x̂ before thresholding: D_c unguided, APG's x̂, or the data prediction of the rule's ε̃."""
    eps_c = tl.load(eps_c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if not GUIDED:
        x_hat = (z - sigma * eps_c) / alpha
    elif RULE == 3:
        x_hat = _apg_x_hat((z - sigma * eps_c) / alpha, z, eps_u_ptr, state_ptr, offs, mask, alpha,
                           sigma, w, rows, row_mask, stats_ptr, apg_eta, apg_norm, HAS_STATE, SPLIT)
    else:
        eps = _rule_eps(eps_c, eps_u_ptr, offs, mask, w, rows, row_mask, stats_ptr, rescale, RULE,
                        SPLIT)
        x_hat = (z - sigma * eps) / alpha
    return x_hat


@_jit()
def _threshold(x_hat, clip, scale_ptr, rows, row_mask, THRESHOLD: tl.constexpr):
    """clamp(x̂, −c, c) (THRESHOLD 1) or clamp(x̂, −s_i, s_i)/s_i (2), NaN propagating."""
    if THRESHOLD == 1:
        x_hat = tl.clamp(x_hat, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    elif THRESHOLD == 2:
        s = tl.load(scale_ptr + rows, mask=row_mask, other=1.0)[:, None]
        x_hat = tl.clamp(x_hat, -s, s, propagate_nan=tl.PropagateNan.ALL) / s
    return x_hat


@_jit()
def _previous_term(z_next, c_p, prev_ptr, offs, mask, HAS_PREV: tl.constexpr):
    """z' + c_p·x̂_prev, x̂_prev read only where c_p ≠ 0; NaN there when no x̂_prev is given."""
    if HAS_PREV:
        x_prev = tl.load(prev_ptr + offs, mask=mask & (c_p != 0.0), other=0.0).to(tl.float32)
        z_next += c_p * x_prev
    else:
        z_next = tl.where(c_p != 0.0, float("nan"), z_next)
    return z_next


@_jit()
def _philox_normals(seed, k, sample_id, pid_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """rng.randn for a tile: (BLOCK_R, BLOCK_D) normals, element j being output j % 4 of Philox at
    counter (j // 4, k, id low word, id high word), by triton.language's Box–Muller pairs."""
    QUADS: tl.constexpr = BLOCK_D // 4
    quad = (pid_d * QUADS + tl.arange(0, QUADS)).to(tl.uint32)  # (Q,) j // 4
    c0 = tl.broadcast_to(quad[None, :], (BLOCK_R, QUADS))
    c1 = tl.broadcast_to((k & 0xFFFFFFFF).to(tl.uint32)[:, None], (BLOCK_R, QUADS))
    c2 = tl.broadcast_to((sample_id & 0xFFFFFFFF).to(tl.uint32)[:, None], (BLOCK_R, QUADS))
    c3 = tl.broadcast_to(((sample_id >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None], (BLOCK_R, QUADS))
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    n0, n1 = pair_uniform_to_normal(uint_to_uniform_float(r0), uint_to_uniform_float(r1))
    n2, n3 = pair_uniform_to_normal(uint_to_uniform_float(r2), uint_to_uniform_float(r3))
    # (R, Q, 2, 2) holding n_(2a+b) at [r, q, a, b]; flattened, element 4q + 2a + b gets it.
    quads = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(quads, (BLOCK_R, BLOCK_D))


@_jit()
def _add_noise(z_next, s, noise_ptr, offs, mask, seed, k, sample_id, pid_d,
               HAS_NOISE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """z' + s·n, n read from `noise` or drawn in-kernel; rows with s = 0 neither read nor draw."""
    if HAS_NOISE:
        n = tl.load(noise_ptr + offs, mask=mask & (s != 0.0), other=0.0).to(tl.float32)
        z_next += s * n
    else:
        if tl.max(tl.abs(s)) != 0.0:  # device-side: the last step and DDIM η = 0 skip Philox
            z_next += s * _philox_normals(seed[:, None], k, sample_id, pid_d, BLOCK_R, BLOCK_D)
    return z_next


@_jit()
def _store_z_next(out_ptr, copy1_ptr, copy2_ptr, offs, mask, z_next, N_COPIES: tl.constexpr):
    """z' into `out` and into the N_COPIES other destinations (the halves of out2)."""
    tl.store(out_ptr + offs, z_next.to(out_ptr.dtype.element_ty), mask=mask)
    if N_COPIES >= 1:
        tl.store(copy1_ptr + offs, z_next.to(copy1_ptr.dtype.element_ty), mask=mask)
    if N_COPIES >= 2:
        tl.store(copy2_ptr + offs, z_next.to(copy2_ptr.dtype.element_ty), mask=mask)


@_jit()
def _z_next(z, x_hat, rows, row_mask, step, pid_d, offs, mask, table_ptr, table_len, prev_ptr,
            noise_ptr, seed_ptr, seed_value, ids_ptr, HAS_PREV: tl.constexpr,
            HAS_NOISE: tl.constexpr, SEED_MODE: tl.constexpr, HAS_IDS: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """z' = c_z·z + c_x·x̂ + c_p·x̂_prev + s·n for a tile."""
    c_z = _table_column(table_ptr, step, table_len, row_mask, 2, 0.0)
    c_x = _table_column(table_ptr, step, table_len, row_mask, 3, 0.0)
    s = _table_column(table_ptr, step, table_len, row_mask, 4, 0.0)
    c_p = _table_column(table_ptr, step, table_len, row_mask, 5, 0.0)
    z_next = _previous_term(c_z * z + c_x * x_hat, c_p, prev_ptr, offs, mask, HAS_PREV)
    seed = _per_row(seed_ptr, seed_value, rows, row_mask, SEED_MODE, tl.int64)
    if HAS_IDS:
        sample_id = _per_row(ids_ptr, 0, rows, row_mask, 2, tl.int64)
    else:  # the default ids 0..B−1, without a tensor allocated per step
        sample_id = rows.to(tl.int64)
    return _add_noise(z_next, s, noise_ptr, offs, mask, seed, step + 1, sample_id, pid_d,
                      HAS_NOISE, BLOCK_R, BLOCK_D)


@_jit(do_not_specialize=["step_value", "seed_value"])
def _guided_step_kernel(eps_c_ptr, eps_u_ptr, z_ptr, noise_ptr, table_ptr, w_ptr, step_ptr,
                        seed_ptr, ids_ptr, stats_ptr, state_ptr, prev_ptr, scale_ptr, x_in_ptr,
                        out_ptr, copy1_ptr, copy2_ptr, x_hat_ptr,
                        batch, numel, table_len, w_value, step_value, seed_value, clip, rescale,
                        apg_eta, apg_norm,
                        GUIDED: tl.constexpr, RULE: tl.constexpr, HAS_STATE: tl.constexpr,
                        W_MODE: tl.constexpr, STEP_MODE: tl.constexpr, SEED_MODE: tl.constexpr,
                        HAS_IDS: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_PREV: tl.constexpr,
                        THRESHOLD: tl.constexpr, LOAD_X_HAT: tl.constexpr,
                        ONLY_X_HAT: tl.constexpr, N_COPIES: tl.constexpr,
                        WRITE_X_HAT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """The fused step (formula above) over a grid (blocks of D, blocks of rows), rows strided by
    the grid's second axis so any B fits CUDA's 65535 limit on it. LOAD_X_HAT takes x̂ from
    `x_in` instead of computing it; ONLY_X_HAT stores x̂ and stops (DynamicThreshold's halves)."""
    pid_d = tl.program_id(0)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) element index j within a row
    for row_block in range(tl.program_id(1), tl.cdiv(batch, BLOCK_R), tl.num_programs(1)):
        rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        row_mask = rows < batch
        mask, offs = _tile(rows, row_mask, cols, numel)
        step = _per_row(step_ptr, step_value, rows, row_mask, STEP_MODE, tl.int64)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if LOAD_X_HAT:
            x_hat = tl.load(x_in_ptr + offs, mask=mask, other=0.0)
        else:
            alpha = _table_column(table_ptr, step, table_len, row_mask, 0, float("nan"))
            sigma = _table_column(table_ptr, step, table_len, row_mask, 1, 0.0)
            w = _per_row(w_ptr, w_value, rows, row_mask, W_MODE, tl.float32)[:, None]
            x_hat = _rule_x_hat(eps_c_ptr, eps_u_ptr, state_ptr, stats_ptr, offs, mask, z, alpha,
                                sigma, w, rows, row_mask, rescale, apg_eta, apg_norm, GUIDED,
                                RULE, HAS_STATE, SPLIT)
        x_hat = _threshold(x_hat, clip, scale_ptr, rows, row_mask, THRESHOLD)
        if ONLY_X_HAT:
            tl.store(x_hat_ptr + offs, x_hat, mask=mask)
        else:
            z_next = _z_next(z, x_hat, rows, row_mask, step, pid_d, offs, mask, table_ptr,
                             table_len, prev_ptr, noise_ptr, seed_ptr, seed_value, ids_ptr,
                             HAS_PREV, HAS_NOISE, SEED_MODE, HAS_IDS, BLOCK_R, BLOCK_D)
            if WRITE_X_HAT:  # after x̂_prev was read: x_hat_out may alias it
                tl.store(x_hat_ptr + offs, x_hat.to(x_hat_ptr.dtype.element_ty), mask=mask)
            _store_z_next(out_ptr, copy1_ptr, copy2_ptr, offs, mask, z_next, N_COPIES)


@_jit()
def _welford_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) summaries; empty sides allowed."""
    n = n_a + n_b
    spread = mean_b - mean_a
    share = tl.where(n > 0.0, n_b / tl.maximum(n, 1.0), 0.0)
    return n, mean_a + spread * share, m2_a + m2_b + spread * spread * n_a * share


@_jit()
def _tile_summary(x, mask, n_b):
    """(mean, M2) of the masked tile x, along axis 1: (BLOCK_R,) each."""
    mean = tl.sum(x, axis=1) / tl.maximum(n_b, 1.0)
    spread = tl.where(mask, x - mean[:, None], 0.0)
    return mean, tl.sum(spread * spread, axis=1)


@_jit()
def _store_partial(stats_ptr, rows, row_mask, split, slot: tl.constexpr, value,
                   SPLIT: tl.constexpr):
    """stats[row, slot, split] = value for each row (stats is [B, STAT_SLOTS = 5, SPLIT])."""
    tl.store(stats_ptr + (rows.to(tl.int64) * 5 + slot) * SPLIT + split, value, mask=row_mask)


@_jit()
def _rescale_stats(eps_c_ptr, eps_u_ptr, stats_ptr, w, rows, row_mask, start, stop, numel,
                   split, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    """(count, mean, M2) of ε_c and of eq. 6's ε over the slice [start, stop) of each row."""
    zero = tl.zeros(rows.shape, tl.float32)
    n, mean_c, m2_c, mean_g, m2_g = zero, zero, zero, zero, zero
    for begin in range(start, stop, BLOCK_D):
        mask, offs = _tile(rows, row_mask, begin + tl.arange(0, BLOCK_D), numel)
        eps_c = tl.load(eps_c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps_u = tl.load(eps_u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps = tl.where(mask, eps_c + w * (eps_c - eps_u), 0.0)
        n_b = tl.sum(mask.to(tl.float32), axis=1)
        tile_mean, tile_m2 = _tile_summary(eps_c, mask, n_b)
        _, mean_c, m2_c = _welford_merge(n, mean_c, m2_c, n_b, tile_mean, tile_m2)
        tile_mean, tile_m2 = _tile_summary(eps, mask, n_b)
        n, mean_g, m2_g = _welford_merge(n, mean_g, m2_g, n_b, tile_mean, tile_m2)
    _store_partial(stats_ptr, rows, row_mask, split, 0, n, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, 1, mean_c, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, 2, m2_c, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, 3, mean_g, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, 4, m2_g, SPLIT)


@_jit()
def _zero_star_stats(eps_c_ptr, eps_u_ptr, stats_ptr, rows, row_mask, start, stop, numel, split,
                     SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    """⟨ε_c, ε_u⟩ and ⟨ε_u, ε_u⟩ over the slice [start, stop) of each row."""
    dot = tl.zeros(rows.shape, tl.float32)
    norm = tl.zeros(rows.shape, tl.float32)
    for begin in range(start, stop, BLOCK_D):
        mask, offs = _tile(rows, row_mask, begin + tl.arange(0, BLOCK_D), numel)
        eps_c = tl.load(eps_c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps_u = tl.load(eps_u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(eps_c * eps_u, axis=1)
        norm += tl.sum(eps_u * eps_u, axis=1)
    _store_partial(stats_ptr, rows, row_mask, split, 0, dot, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, 1, norm, SPLIT)


@_jit()
def _apg_stats(eps_c_ptr, eps_u_ptr, z_ptr, state_ptr, stats_ptr, alpha, sigma, momentum, rows,
               row_mask, start, stop, numel, split, HAS_STATE: tl.constexpr,
               READ_STATE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    """m ← (D_c − D_u) + β·m over the slice [start, stop) of each row (stored when there is a
    state), and the slice's ‖m‖², ⟨m, D_c⟩, ⟨D_c, D_c⟩."""
    mm = tl.zeros(rows.shape, tl.float32)
    md = tl.zeros(rows.shape, tl.float32)
    dd = tl.zeros(rows.shape, tl.float32)
    for begin in range(start, stop, BLOCK_D):
        mask, offs = _tile(rows, row_mask, begin + tl.arange(0, BLOCK_D), numel)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d_c = _data_prediction(z, eps_c_ptr, offs, mask, alpha, sigma)
        m = tl.where(mask, d_c - _data_prediction(z, eps_u_ptr, offs, mask, alpha, sigma), 0.0)
        d_c = tl.where(mask, d_c, 0.0)
        if READ_STATE:  # β ≠ 0; with β = 0 the old m is not read (m ← Δ)
            m += momentum * tl.load(state_ptr + offs, mask=mask, other=0.0)
        if HAS_STATE:
            tl.store(state_ptr + offs, m, mask=mask)
        mm += tl.sum(m * m, axis=1)
        md += tl.sum(m * d_c, axis=1)
        dd += tl.sum(d_c * d_c, axis=1)
    _store_partial(stats_ptr, rows, row_mask, split, 0, mm, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, 1, md, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, 2, dd, SPLIT)


@_jit(do_not_specialize=["step_value"])
def _row_stats_kernel(eps_c_ptr, eps_u_ptr, z_ptr, table_ptr, w_ptr, step_ptr, state_ptr,
                      stats_ptr, batch, numel, table_len, w_value, step_value, momentum, chunk,
                      RULE: tl.constexpr, W_MODE: tl.constexpr, STEP_MODE: tl.constexpr,
                      HAS_STATE: tl.constexpr, READ_STATE: tl.constexpr, SPLIT: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The reduction pass (above): program (k, ·) reduces elements [k·chunk, (k + 1)·chunk) of
    its rows, rows strided by the grid's second axis."""
    split = tl.program_id(0)
    start = split * chunk
    stop = tl.minimum(start + chunk, numel)
    for row_block in range(tl.program_id(1), tl.cdiv(batch, BLOCK_R), tl.num_programs(1)):
        rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        row_mask = rows < batch
        if RULE == 1:
            w = _per_row(w_ptr, w_value, rows, row_mask, W_MODE, tl.float32)[:, None]
            _rescale_stats(eps_c_ptr, eps_u_ptr, stats_ptr, w, rows, row_mask, start, stop,
                           numel, split, SPLIT, BLOCK_D)
        elif RULE == 2:
            _zero_star_stats(eps_c_ptr, eps_u_ptr, stats_ptr, rows, row_mask, start, stop, numel,
                             split, SPLIT, BLOCK_D)
        else:
            step = _per_row(step_ptr, step_value, rows, row_mask, STEP_MODE, tl.int64)
            alpha = _table_column(table_ptr, step, table_len, row_mask, 0, float("nan"))
            sigma = _table_column(table_ptr, step, table_len, row_mask, 1, 0.0)
            _apg_stats(eps_c_ptr, eps_u_ptr, z_ptr, state_ptr, stats_ptr, alpha, sigma, momentum,
                       rows, row_mask, start, stop, numel, split, HAS_STATE, READ_STATE, SPLIT,
                       BLOCK_D)


# ---------------------------------------------------------------------------------------------
# The launcher.
# ---------------------------------------------------------------------------------------------

TILE_ELEMENTS = 2048  # per program: 8 values per thread at 8 warps, two 16-byte fp32 vectors
# ptxas's own heuristic capped some 256-thread step specialisations at 64 registers and spilled
# 8–16 bytes (x̂ written at a 0-d step in bf16/fp16 on sm_90, the dpmpp term in fp32 on sm_80:
# `python -m cfgengine.kernels.aot`); 80 lets them fit and still runs 3 blocks of 256 threads per
# SM. The occupancy trade-off is unmeasured (no GPU yet): bench/gpu_check.py times it.
STEP_MAX_REGISTERS = 80
MAX_GRID_ROWS = 65535  # CUDA's limit on the grid's second axis; the kernels stride past it
MAX_SPLIT = 32  # slices per row in the reduction pass: ≥ 256 programs at B = 8 for a big D, and
                # the step kernel's SPLIT·5 partial reads stay ~2% of a tile's bytes


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """One launch's tile (block_rows × block_d elements per program) and warps per program."""
    block_rows: int
    block_d: int
    num_warps: int


@dataclasses.dataclass(frozen=True)
class StepOperands:
    """One step's operands as `guided_step` takes them, checked once."""
    eps2: torch.Tensor
    z: torch.Tensor
    w: float | torch.Tensor
    table: torch.Tensor
    step: int | torch.Tensor
    rule: CFG | ZeroStar | APG
    state: torch.Tensor | None
    x_hat_prev: torch.Tensor | None
    clip: float | DynamicThreshold | None
    noise: torch.Tensor | None
    seed: int | torch.Tensor
    sample_ids: torch.Tensor | None
    out: torch.Tensor | None
    x_hat_out: torch.Tensor | None
    out2: torch.Tensor | None


def launch_config(batch: int, numel: int) -> LaunchConfig:
    """Tiles of about TILE_ELEMENTS: a segment of one row when D is large, several rows when D is
    small (toy 2-d samples), so every program moves the same bytes. block_d ≥ 16 keeps it a
    multiple of the 4 Philox outputs. No autotuning: the step is bandwidth-bound and this is
    deterministic."""
    block_d = max(16, min(_next_power_of_2(numel), TILE_ELEMENTS))
    block_rows = max(1, min(_next_power_of_2(batch), TILE_ELEMENTS // block_d))
    num_warps = 8 if block_rows * block_d >= 2048 else 4
    return LaunchConfig(block_rows, block_d, num_warps)


def stats_split(numel: int, config: LaunchConfig) -> int:
    """Slices per row for the reduction pass (a power of two): one per tile of the row, at most
    MAX_SPLIT. A function of the row's size only, so a row's sums are added in the same order
    whatever the batch around it."""
    return min(MAX_SPLIT, _next_power_of_2(triton.cdiv(numel, config.block_d)))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _row_operand(value, fallback: torch.Tensor, cast):
    """(mode, tensor, scalar) for `_per_row`: 0 a Python number, 1 a one-element tensor, 2 a row
    tensor. `fallback` stands in for the pointer a scalar does not use."""
    if not isinstance(value, torch.Tensor):
        return 0, fallback, cast(value)
    return (1 if value.numel() == 1 else 2), value.contiguous(), cast(0)


def rule_mode(rule: CFG | ZeroStar | APG, guided: bool) -> int:
    """The kernels' RULE: plain eq. 6 (also every unguided step), rescale, ZeroStar or APG."""
    if not guided:
        return RULE_PLAIN
    if isinstance(rule, APG):
        return RULE_APG
    if isinstance(rule, ZeroStar):
        return RULE_ZERO_STAR
    return RULE_RESCALE if rule.rescale > 0.0 else RULE_PLAIN


def guided_step_triton(eps2: torch.Tensor, z: torch.Tensor, w: float | torch.Tensor,
                       table: torch.Tensor, step: int | torch.Tensor, *,
                       rule: CFG | ZeroStar | APG | None = None,
                       state: torch.Tensor | None = None, x_hat_prev: torch.Tensor | None = None,
                       clip: float | DynamicThreshold | None = None,
                       noise: torch.Tensor | None = None, seed: int | torch.Tensor = 0,
                       sample_ids: torch.Tensor | None = None, out: torch.Tensor | None = None,
                       x_hat_out: torch.Tensor | None = None, out2: torch.Tensor | None = None,
                       config: LaunchConfig | None = None) -> torch.Tensor:
    """Launch the fused kernels for `guided_step` (same arguments; `config` overrides the tile)."""
    _require_triton(z.device)
    rule = CFG() if rule is None else rule
    check_step_args(eps2, z, w, table, step, noise, out, x_hat_out, out2, "triton", rule=rule,
                    state=state, x_hat_prev=x_hat_prev, clip=clip)
    check_kernel_operands(eps2, z, w, table, step, noise, seed, sample_ids, out, x_hat_out, out2,
                          state=state, x_hat_prev=x_hat_prev)
    return _launch(StepOperands(eps2, z, w, table, step, rule, state, x_hat_prev, clip, noise,
                                seed, sample_ids, out, x_hat_out, out2), config)


def _launch(ops: StepOperands, config: LaunchConfig | None) -> torch.Tensor:
    """The launches themselves, on operands already checked (each step validates once): the
    reduction pass when the rule needs it, then the step; DynamicThreshold splits the step at x̂
    around torch's per-sample quantile (docs/design.md: its cost)."""
    batch, numel = ops.z.shape[0], ops.z[0].numel()
    out = ops.out
    if out is None:
        out = ops.out2[:batch] if ops.out2 is not None else torch.empty_like(ops.z)
    ops = dataclasses.replace(ops, eps2=ops.eps2.contiguous(), z=ops.z.contiguous(),
                              table=ops.table.contiguous(), out=out)  # rows of 6 floats
    config = config or launch_config(batch, numel)
    mode = rule_mode(ops.rule, ops.eps2.shape[0] == 2 * batch)
    stats, split = _launch_row_stats(ops, mode, config)
    if not isinstance(ops.clip, DynamicThreshold):
        _launch_step(ops, mode, stats, split, config)
        return out
    x_hat = torch.empty(ops.z.shape, dtype=torch.float32, device=ops.z.device)
    _launch_step(ops, mode, stats, split, config, x_hat=x_hat)
    scale = dynamic_threshold_scale(x_hat, ops.clip)  # (B,) fp32
    _launch_step(ops, mode, stats, split, config, x_hat=x_hat, scale=scale)
    return out


def _launch_row_stats(ops: StepOperands, mode: int, config: LaunchConfig):
    """The reduction pass: (stats [B, STAT_SLOTS, SPLIT] fp32, SPLIT); (z, 1) when not needed."""
    if mode == RULE_PLAIN:
        return ops.z, 1
    batch, numel = ops.z.shape[0], ops.z[0].numel()
    split = stats_split(numel, config)
    chunk = triton.cdiv(triton.cdiv(numel, config.block_d), split) * config.block_d
    stats = torch.empty(batch, STAT_SLOTS, split, dtype=torch.float32, device=ops.z.device)
    w_mode, w_ptr, w_value = _row_operand(ops.w, ops.z, float)
    step_mode, step_ptr, step_value = _row_operand(ops.step, ops.table, int)
    momentum = ops.rule.momentum if mode == RULE_APG else 0.0
    grid = (split, min(triton.cdiv(batch, config.block_rows), MAX_GRID_ROWS))
    _row_stats_kernel[grid](
        ops.eps2, ops.eps2[batch:], ops.z, ops.table, w_ptr, step_ptr, _or(ops.state, ops.z),
        stats, batch, numel, ops.table.shape[0], w_value, step_value, float(momentum), chunk,
        RULE=mode, W_MODE=w_mode, STEP_MODE=step_mode, HAS_STATE=ops.state is not None,
        READ_STATE=momentum != 0.0, SPLIT=split, BLOCK_R=config.block_rows,
        BLOCK_D=config.block_d, num_warps=config.num_warps)
    return stats, split


def _launch_step(ops: StepOperands, mode: int, stats: torch.Tensor, split: int,
                 config: LaunchConfig, *, x_hat: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> None:
    """The step kernel: whole (no x_hat), its first half (x_hat given: store x̂ unthresholded),
    or its second half (x_hat and scale: x̂ read back, thresholded by `scale`)."""
    batch, numel = ops.z.shape[0], ops.z[0].numel()
    only_x_hat = x_hat is not None and scale is None
    dests = _destinations(ops.out, ops.out2)
    rule = ops.rule
    w_mode, w_ptr, w_value = _row_operand(ops.w, ops.z, float)
    step_mode, step_ptr, step_value = _row_operand(ops.step, ops.table, int)
    seed_mode, seed_ptr, seed_value = _row_operand(ops.seed, ops.table, int)
    x_hat_dest = x_hat if only_x_hat else ops.x_hat_out
    grid = (triton.cdiv(numel, config.block_d),
            min(triton.cdiv(batch, config.block_rows), MAX_GRID_ROWS))
    _guided_step_kernel[grid](
        ops.eps2, ops.eps2[batch:] if ops.eps2.shape[0] == 2 * batch else ops.eps2, ops.z,
        _or(ops.noise, ops.z), ops.table, w_ptr, step_ptr, seed_ptr, _or(ops.sample_ids, ops.table),
        stats, _or(ops.state, ops.z), _or(ops.x_hat_prev, ops.z), _or(scale, ops.table),
        _or(x_hat, ops.z), *(dests + [ops.out] * (3 - len(dests))), _or(x_hat_dest, ops.z),
        batch, numel, ops.table.shape[0], w_value, step_value, seed_value,
        float(ops.clip) if _is_number(ops.clip) else 0.0,
        float(rule.rescale) if isinstance(rule, CFG) else 0.0,
        float(rule.eta) if isinstance(rule, APG) else 0.0,
        float(rule.norm_threshold) if isinstance(rule, APG) else 0.0,
        GUIDED=ops.eps2.shape[0] == 2 * batch, RULE=mode,
        HAS_STATE=mode == RULE_APG and ops.state is not None, W_MODE=w_mode,
        STEP_MODE=step_mode, SEED_MODE=seed_mode, HAS_IDS=ops.sample_ids is not None,
        HAS_NOISE=ops.noise is not None, HAS_PREV=ops.x_hat_prev is not None,
        THRESHOLD=_threshold_mode(ops.clip, only_x_hat), LOAD_X_HAT=scale is not None,
        ONLY_X_HAT=only_x_hat, N_COPIES=len(dests) - 1, WRITE_X_HAT=x_hat_dest is not None,
        SPLIT=split, BLOCK_R=config.block_rows, BLOCK_D=config.block_d,
        num_warps=config.num_warps, maxnreg=STEP_MAX_REGISTERS)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _threshold_mode(clip, only_x_hat: bool) -> int:
    """THRESHOLD for one launch: DynamicThreshold's first half stores x̂ unthresholded."""
    if clip is None or only_x_hat:
        return THRESHOLD_NONE
    return THRESHOLD_SCALE if isinstance(clip, DynamicThreshold) else THRESHOLD_CLIP


def _or(tensor: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """`tensor`, made contiguous, or `fallback` for a pointer the kernel's flags leave unread."""
    return fallback if tensor is None else tensor.contiguous()


def check_kernel_operands(eps2, z, w, table, step, noise, seed, sample_ids, out, x_hat_out,
                          out2, *, state=None, x_hat_prev=None) -> None:
    """What the kernel needs beyond `check_step_args`: one device, float storage, integer steps,
    seeds and ids, contiguous outputs, rows under 2³¹ elements. Raises ValueError."""
    tensors = dict(eps2=eps2, z=z, w=w, table=table, step=step, noise=noise, seed=seed,
                   sample_ids=sample_ids, out=out, x_hat_out=x_hat_out, out2=out2, state=state,
                   x_hat_prev=x_hat_prev)
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != z.device:
            raise ValueError(f"{name} is on {t.device}, z on {z.device}")
    for name in ("eps2", "z", "noise", "out", "x_hat_out", "out2", "x_hat_prev"):
        t = tensors[name]
        if t is not None and t.dtype not in STORAGE_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    for name in ("out", "x_hat_out", "out2", "state"):
        if tensors[name] is not None and not tensors[name].is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel writes it in place)")
    _check_index_operands(z.shape[0], w, step, seed, sample_ids)
    if z[0].numel() >= 2**31:
        raise ValueError(f"a sample has {z[0].numel()} elements; the kernel indexes rows in int32")


def _check_index_operands(batch, w, step, seed, sample_ids) -> None:
    """Dtypes and sizes of the per-row operands: float w, integer step/seed, int64 sample ids."""
    if isinstance(w, torch.Tensor) and not w.is_floating_point():
        raise ValueError(f"w must be a float tensor, got {w.dtype}")
    for name, t in (("step", step), ("seed", seed)):
        if isinstance(t, torch.Tensor) and t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int64 tensor, got {t.dtype}")
    if isinstance(seed, torch.Tensor) and seed.numel() != 1:
        raise ValueError(f"seed must be an int or a 0-d tensor, got shape {tuple(seed.shape)}")
    if isinstance(seed, int):
        rng.split_seed(seed)  # raises on seeds outside [0, 2^63)
    if sample_ids is not None and (sample_ids.dtype != torch.int64 or sample_ids.numel() != batch):
        raise ValueError(f"sample_ids must be an int64 Tensor[{batch}], got {sample_ids.dtype} "
                         f"{tuple(sample_ids.shape)}")
