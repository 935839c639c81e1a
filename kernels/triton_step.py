"""The fused Triton kernels of the guided step (formula: kernels/contract.py; the definition:
kernels/reference.py). Private: kernels/launch.py checks the operands, picks the tile, launches.

At most two passes over memory per step (three launches with DynamicThreshold, whose quantile
torch computes in between):

  _row_stats_kernel   (rescale, ZeroStar, APG only) grid (SPLIT, row blocks): program (k, rows)
                      reduces its k-th contiguous slice of each row to a few fp32 partials
                      stats[i, :, k] — rescale: count and (mean, M2) of ε_c and of eq. 6's ε
                      (Chan's pairwise merge, no cancellation); ZeroStar: ⟨ε_c, ε_u⟩, ⟨ε_u, ε_u⟩;
                      APG: ‖m‖², ⟨m, D_c⟩, ⟨D_c, D_c⟩ after m ← (D_c − D_u) + β·m, which it
                      writes.
                      Slices, not atomics: the sums are deterministic and row i reads row i only.
  _guided_step_kernel grid (blocks of D, row blocks); one program owns BLOCK_R rows × BLOCK_D
                      elements and computes, in fp32 from any storage dtype, rounding once per
                      store:
    (α, σ, c_z, c_x, s, c_p) = table[step_i]                (NaN α when step_i is off the table)
    ε̃  = ε_c + w_i·(ε_c − ε_u)                   CFG (eq. 6, in the reference's rounding)
       · (1 + φ·(std(ε_c)/std(ε̃) − 1))           CFG(rescale = φ), from the SPLIT partials
    ε̃  = ε_c + w_i·(ε_c − s*·ε_u), s* = ⟨ε_c, ε_u⟩/(⟨ε_u, ε_u⟩ + 1e−8)    ZeroStar
    x̂  = (z − σ·ε̃)/α, or for APG x̂ = D_c + w_i·(Δ⊥ + η·Δ∥), Δ = m·min(1, r/‖m‖)
    x̂  = clamp(x̂, −c, c), or clamp(x̂, −s_i, s_i)/s_i with s_i DynamicThreshold's scale
    z' = c_z·z + c_x·x̂ + c_p·x̂₁ + c_p2·x̂₂ + c_p3·x̂₃ + s·n,  n = noise[i, j], or output j % 4
         of Philox4x32-10 keyed by `seed` at counter (j // 4, step_i + 1, id_i low, id_i high)
         (rng.py)
  ε̃ = ε_c (x̂ = D_c) when GUIDED is off (eps2 has B rows). HAS_DELTA (CFG(refresh)): a GUIDED
  step stores Δ = ε_c − ε_u and takes ε̃ = ε_c + w_i·Δ; an unguided one reads the stored Δ for
  the same ε̃ (the only extra traffic: Δ written, or read, once in fp32). Rows whose s is 0 read
  no noise and draw none; rows whose c_p (c_p2, c_p3) is 0 read no x̂₁ (x̂₂, x̂₃) for z', though
  a kept history is moved one step back on every row. Traffic: the table in kernels/reference.py.

Every mode, column and slot the kernels test or index is a named constexpr below.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

from cfgengine.kernels import contract

_c = tl.constexpr
RULE_RESCALE, RULE_ZERO_STAR, RULE_APG = (_c(contract.RULE_RESCALE), _c(contract.RULE_ZERO_STAR),
                                          _c(contract.RULE_APG))
THRESHOLD_CLIP, THRESHOLD_SCALE = _c(contract.THRESHOLD_CLIP), _c(contract.THRESHOLD_SCALE)
ALPHA, SIGMA, C_Z, C_X, NOISE, C_P = (_c(contract.ALPHA), _c(contract.SIGMA), _c(contract.C_Z),
                                      _c(contract.C_X), _c(contract.NOISE), _c(contract.C_P))
C_P2, C_P3 = _c(contract.C_P2), _c(contract.C_P3)
ZERO_STAR_EPS, APG_NORM_FLOOR = _c(contract.ZERO_STAR_EPS), _c(contract.APG_NORM_FLOOR)
# How a per-row operand (w, step, seed, sample id) arrives: a Python number, one value in a
# device tensor shared by every row (a CUDA graph's step), or a value per row.
OPERAND_SCALAR, OPERAND_SHARED, OPERAND_ROWS = range(3)
_SCALAR, _SHARED, _ROWS = _c(OPERAND_SCALAR), _c(OPERAND_SHARED), _c(OPERAND_ROWS)
# stats[i, slot, k]: the partials of slice k of row i; rescale's five are the most.
STAT_SLOTS = 5
_STAT_SLOTS = _c(STAT_SLOTS)
COUNT, MEAN_C, M2_C, MEAN_G, M2_G = (_c(i) for i in range(5))  # rescale: ε_c and eq. 6's ε
DOT_CU, DOT_UU = _c(0), _c(1)  # ZeroStar: ⟨ε_c, ε_u⟩, ⟨ε_u, ε_u⟩
DOT_MM, DOT_MD, DOT_DD = _c(0), _c(1), _c(2)  # APG: ‖m‖², ⟨m, D_c⟩, ⟨D_c, D_c⟩


@triton.jit
def _per_row(ptr, value, rows, row_mask, MODE: tl.constexpr, DTYPE: tl.constexpr):
    """A per-row operand as (BLOCK_R,) DTYPE, arriving as MODE says (OPERAND_*): the scalar
    `value`, the single value at `ptr` (a 0-d device tensor, read by every row), or `ptr[row]`."""
    if MODE == _SCALAR:
        x = value + tl.zeros(rows.shape, DTYPE)
    elif MODE == _SHARED:
        x = tl.load(ptr + rows * 0, mask=row_mask, other=0).to(DTYPE)  # ptr[0] for every row
    else:
        x = tl.load(ptr + rows, mask=row_mask, other=0).to(DTYPE)
    return x


@triton.jit
def _table_column(table_ptr, step, table_len, row_mask, column: tl.constexpr, missing,
                  WIDTH: tl.constexpr):
    """table[step_i, column] of the [T, WIDTH] table for each row as (BLOCK_R, 1) fp32;
    `missing` off the table."""
    valid = row_mask & (step >= 0) & (step < table_len)
    return tl.load(table_ptr + step * WIDTH + column, mask=valid, other=missing)[:, None]


@triton.jit
def _tile(rows, row_mask, cols, numel):
    """(mask, int64 offsets) of the tile rows × cols of a [B, numel] tensor: int64 because B·D
    may pass 2³¹."""
    mask = row_mask[:, None] & (cols < numel)[None, :]
    return mask, rows.to(tl.int64)[:, None] * numel + cols[None, :]


@triton.jit
def _data_prediction(z, eps_ptr, offs, mask, alpha, sigma):
    """x̂ = (z − σ·ε)/α with ε loaded from `eps_ptr`."""
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (z - sigma * eps) / alpha


@triton.jit
def _partials(stats_ptr, rows, row_mask, slot: tl.constexpr, SPLIT: tl.constexpr):
    """The SPLIT partials of one statistic for each row, (BLOCK_R, SPLIT) fp32."""
    first = (rows.to(tl.int64) * _STAT_SLOTS + slot)[:, None] * SPLIT  # stats[row, slot, 0]
    ptrs = stats_ptr + first + tl.arange(0, SPLIT)[None, :]
    return tl.load(ptrs, mask=row_mask[:, None], other=1.0)  # 1: no 0/0 on rows past the batch


@triton.jit
def _row_total(stats_ptr, rows, row_mask, slot: tl.constexpr, SPLIT: tl.constexpr):
    """Σ of one statistic's partials: (BLOCK_R, 1)."""
    return tl.sum(_partials(stats_ptr, rows, row_mask, slot, SPLIT), axis=1)[:, None]


@triton.jit
def _row_std(stats_ptr, rows, row_mask, mean_slot: tl.constexpr, SPLIT: tl.constexpr):
    """Unbiased std of each row from its slices' (count, mean, M2), Chan et al.'s merge:
    (BLOCK_R, 1)."""
    count = _partials(stats_ptr, rows, row_mask, COUNT, SPLIT)
    mean = _partials(stats_ptr, rows, row_mask, mean_slot, SPLIT)
    n = tl.where(row_mask, tl.sum(count, axis=1), 2.0)  # rows past the batch: no 0/0
    row_mean = tl.sum(count * mean, axis=1) / n
    spread = mean - row_mean[:, None]
    m2 = tl.sum(_partials(stats_ptr, rows, row_mask, mean_slot + 1, SPLIT), axis=1)
    return tl.sqrt((m2 + tl.sum(count * spread * spread, axis=1)) / (n - 1.0))[:, None]


@triton.jit
def _rule_eps(eps_c, eps_u_ptr, offs, mask, w, rows, row_mask, stats_ptr, rescale,
              RULE: tl.constexpr, SPLIT: tl.constexpr):
    """ε̃ of CFG, CFG(rescale) or ZeroStar (formula above) from the loaded ε_c."""
    eps_u = tl.load(eps_u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RULE == RULE_ZERO_STAR:  # s*·ε_u stands in for ε_u
        scale = _row_total(stats_ptr, rows, row_mask, DOT_CU, SPLIT) / (
            _row_total(stats_ptr, rows, row_mask, DOT_UU, SPLIT) + ZERO_STAR_EPS)
        eps_u = scale * eps_u
    eps = eps_c + w * (eps_c - eps_u)
    if RULE == RULE_RESCALE:
        ratio = (_row_std(stats_ptr, rows, row_mask, MEAN_C, SPLIT)
                 / _row_std(stats_ptr, rows, row_mask, MEAN_G, SPLIT))
        eps = eps * (1.0 + rescale * (ratio - 1.0))
    return eps


@triton.jit
def _apg_x_hat(d_c, z, eps_u_ptr, momentum_ptr, offs, mask, alpha, sigma, w, rows, row_mask,
               stats_ptr, apg_eta, apg_norm, HAS_MOMENTUM: tl.constexpr, SPLIT: tl.constexpr):
    """APG's x̂ = D_c + w·(Δ⊥ + η·Δ∥) from the momentum m (the one the stats pass wrote, or
    D_c − D_u when none is kept) and the row's ‖m‖², ⟨m, D_c⟩, ⟨D_c, D_c⟩."""
    if HAS_MOMENTUM:
        m = tl.load(momentum_ptr + offs, mask=mask, other=0.0)
    else:
        m = d_c - _data_prediction(z, eps_u_ptr, offs, mask, alpha, sigma)
    norm = tl.sqrt(_row_total(stats_ptr, rows, row_mask, DOT_MM, SPLIT))
    shrink = tl.where(apg_norm > 0.0, tl.minimum(apg_norm / norm, 1.0), 1.0)
    dot = shrink * _row_total(stats_ptr, rows, row_mask, DOT_MD, SPLIT) / tl.maximum(
        _row_total(stats_ptr, rows, row_mask, DOT_DD, SPLIT), APG_NORM_FLOOR)
    delta = shrink * m
    parallel = dot * d_c
    return d_c + w * ((delta - parallel) + apg_eta * parallel)


@triton.jit
def _refresh_eps(eps_c, eps_u_ptr, delta_ptr, offs, mask, w, GUIDED: tl.constexpr):
    """CFG(refresh)'s ε̃ = ε_c + w·Δ: Δ = ε_c − ε_u computed and stored on a GUIDED step, else
    the stored Δ read back."""
    if GUIDED:
        delta = eps_c - tl.load(eps_u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(delta_ptr + offs, delta, mask=mask)
    else:
        delta = tl.load(delta_ptr + offs, mask=mask, other=0.0)
    return eps_c + w * delta


@triton.jit
def _rule_x_hat(eps_c_ptr, eps_u_ptr, momentum_ptr, delta_ptr, stats_ptr, offs, mask, z, alpha,
                sigma, w, rows, row_mask, rescale, apg_eta, apg_norm, GUIDED: tl.constexpr,
                RULE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_DELTA: tl.constexpr,
                SPLIT: tl.constexpr):
    """x̂ before thresholding: D_c unguided, APG's x̂, or the data prediction of the rule's ε̃
    (CFG(refresh): from the stored or the fresh Δ)."""
    eps_c = tl.load(eps_c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x_hat = (z - sigma * _refresh_eps(eps_c, eps_u_ptr, delta_ptr, offs, mask, w,
                                          GUIDED)) / alpha
    elif not GUIDED:
        x_hat = (z - sigma * eps_c) / alpha
    elif RULE == RULE_APG:
        x_hat = _apg_x_hat((z - sigma * eps_c) / alpha, z, eps_u_ptr, momentum_ptr, offs, mask,
                           alpha, sigma, w, rows, row_mask, stats_ptr, apg_eta, apg_norm,
                           HAS_MOMENTUM, SPLIT)
    else:
        eps = _rule_eps(eps_c, eps_u_ptr, offs, mask, w, rows, row_mask, stats_ptr, rescale, RULE,
                        SPLIT)
        x_hat = (z - sigma * eps) / alpha
    return x_hat


@triton.jit
def _threshold(x_hat, clip, scale_ptr, rows, row_mask, THRESHOLD: tl.constexpr):
    """clamp(x̂, −c, c) (THRESHOLD_CLIP) or clamp(x̂, −s_i, s_i)/s_i (THRESHOLD_SCALE), NaN
    propagating."""
    if THRESHOLD == THRESHOLD_CLIP:
        x_hat = tl.clamp(x_hat, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    elif THRESHOLD == THRESHOLD_SCALE:
        s = tl.load(scale_ptr + rows, mask=row_mask, other=1.0)[:, None]
        x_hat = tl.clamp(x_hat, -s, s, propagate_nan=tl.PropagateNan.ALL) / s
    return x_hat


@triton.jit
def _previous_term(z_next, c_p, x_prev_ptr, offs, mask, HAS_X_HAT: tl.constexpr):
    """z' + c_p·x̂_prev, x̂_prev read only where c_p ≠ 0; NaN there when no x̂ is kept."""
    if HAS_X_HAT:
        x_prev = tl.load(x_prev_ptr + offs, mask=mask & (c_p != 0.0), other=0.0).to(tl.float32)
        z_next += c_p * x_prev
    else:
        z_next = tl.where(c_p != 0.0, float("nan"), z_next)
    return z_next


@triton.jit
def _older_terms(z_next, table_ptr, step, table_len, row_mask, x_prev2_ptr, x_prev3_ptr, offs,
                 mask, HISTORY: tl.constexpr, WIDTH: tl.constexpr):
    """z' + c_p2·x̂₂ + c_p3·x̂₃, for the columns the table has."""
    if WIDTH > C_P2:
        c_p2 = _table_column(table_ptr, step, table_len, row_mask, C_P2, 0.0, WIDTH)
        z_next = _previous_term(z_next, c_p2, x_prev2_ptr, offs, mask, HISTORY >= 2)
    if WIDTH > C_P3:
        c_p3 = _table_column(table_ptr, step, table_len, row_mask, C_P3, 0.0, WIDTH)
        z_next = _previous_term(z_next, c_p3, x_prev3_ptr, offs, mask, HISTORY >= 3)
    return z_next


@triton.jit
def _move_history(x_prev_ptr, x_prev2_ptr, x_prev3_ptr, offs, mask, HISTORY: tl.constexpr):
    """The kept x̂ history one step back in place (x̂₃ ← x̂₂, x̂₂ ← x̂₁; the caller then stores
    x̂ into x̂₁), each element read before it is written. Run after z' is stored, when the
    noise's registers are free: inside z' it spilled at the 80-register cap."""
    if HISTORY >= 3:
        older = tl.load(x_prev2_ptr + offs, mask=mask, other=0.0)
        tl.store(x_prev3_ptr + offs, older.to(x_prev3_ptr.dtype.element_ty), mask=mask)
    if HISTORY >= 2:
        older = tl.load(x_prev_ptr + offs, mask=mask, other=0.0)
        tl.store(x_prev2_ptr + offs, older.to(x_prev2_ptr.dtype.element_ty), mask=mask)


@triton.jit
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


@triton.jit
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


@triton.jit
def _store_z_next(out_ptr, copy_ptr, offs, mask, z_next, DOUBLED_OUT: tl.constexpr):
    """z' into `out`, and into `copy` (the second half of a 2B-row out) when DOUBLED_OUT."""
    z_next = z_next.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, z_next, mask=mask)
    if DOUBLED_OUT:
        tl.store(copy_ptr + offs, z_next, mask=mask)


@triton.jit
def _z_next(z, x_hat, rows, row_mask, step, pid_d, offs, mask, table_ptr, table_len, x_prev_ptr,
            x_prev2_ptr, x_prev3_ptr, noise_ptr, seed_ptr, seed_value, ids_ptr,
            HISTORY: tl.constexpr, WIDTH: tl.constexpr, HAS_NOISE: tl.constexpr,
            SEED_MODE: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """z' = c_z·z + c_x·x̂ + c_p·x̂₁ + c_p2·x̂₂ + c_p3·x̂₃ + s·n for a tile."""
    c_z = _table_column(table_ptr, step, table_len, row_mask, C_Z, 0.0, WIDTH)
    c_x = _table_column(table_ptr, step, table_len, row_mask, C_X, 0.0, WIDTH)
    s = _table_column(table_ptr, step, table_len, row_mask, NOISE, 0.0, WIDTH)
    c_p = _table_column(table_ptr, step, table_len, row_mask, C_P, 0.0, WIDTH)
    z_next = _previous_term(c_z * z + c_x * x_hat, c_p, x_prev_ptr, offs, mask, HISTORY >= 1)
    z_next = _older_terms(z_next, table_ptr, step, table_len, row_mask, x_prev2_ptr, x_prev3_ptr,
                          offs, mask, HISTORY, WIDTH)
    seed = _per_row(seed_ptr, seed_value, rows, row_mask, SEED_MODE, tl.int64)
    if HAS_IDS:
        sample_id = _per_row(ids_ptr, 0, rows, row_mask, _ROWS, tl.int64)
    else:  # the default ids 0..B−1, without a tensor allocated per step
        sample_id = rows.to(tl.int64)
    return _add_noise(z_next, s, noise_ptr, offs, mask, seed, step + 1, sample_id, pid_d,
                      HAS_NOISE, BLOCK_R, BLOCK_D)


@triton.jit(do_not_specialize=["step_value", "seed_value"])
def _guided_step_kernel(eps_c_ptr, eps_u_ptr, z_ptr, noise_ptr, table_ptr, w_ptr, step_ptr,
                        seed_ptr, ids_ptr, stats_ptr, momentum_ptr, delta_ptr, x_prev_ptr,
                        x_hat_ptr, x_prev2_ptr, x_prev3_ptr, scale_ptr, x_tmp_ptr, out_ptr,
                        copy_ptr, batch, numel, table_len, w_value, step_value, seed_value, clip,
                        rescale, apg_eta, apg_norm,
                        GUIDED: tl.constexpr, RULE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                        HAS_DELTA: tl.constexpr, W_MODE: tl.constexpr, STEP_MODE: tl.constexpr,
                        SEED_MODE: tl.constexpr, HAS_IDS: tl.constexpr, HAS_NOISE: tl.constexpr,
                        HISTORY: tl.constexpr, WIDTH: tl.constexpr, THRESHOLD: tl.constexpr,
                        LOAD_X_HAT: tl.constexpr,
                        ONLY_X_HAT: tl.constexpr, DOUBLED_OUT: tl.constexpr,
                        SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The fused step (formula above) over a grid (blocks of D, blocks of rows), rows strided by
    the grid's second axis so any B fits CUDA's 65535 limit on it. DynamicThreshold's halves:
    ONLY_X_HAT stores the unthresholded x̂ into `x_tmp` and stops; LOAD_X_HAT reads it back
    instead of computing it. HISTORY: how many x̂ of earlier steps are kept (0–3); the last one
    is read as x̂₁ (`x_prev`), then overwritten (`x_hat`): one buffer passed as two pointers,
    since through one pointer the fp32 0-d step spilled 16 B on sm_90 at the 80-register cap
    (`python -m cfgengine.kernels.aot`). WIDTH: the table's columns (6–8)."""
    pid_d = tl.program_id(0)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) element index j within a row
    for row_block in range(tl.program_id(1), tl.cdiv(batch, BLOCK_R), tl.num_programs(1)):
        rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        row_mask = rows < batch
        mask, offs = _tile(rows, row_mask, cols, numel)
        step = _per_row(step_ptr, step_value, rows, row_mask, STEP_MODE, tl.int64)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if LOAD_X_HAT:
            x_hat = tl.load(x_tmp_ptr + offs, mask=mask, other=0.0)
        else:
            alpha = _table_column(table_ptr, step, table_len, row_mask, ALPHA, float("nan"), WIDTH)
            sigma = _table_column(table_ptr, step, table_len, row_mask, SIGMA, 0.0, WIDTH)
            w = _per_row(w_ptr, w_value, rows, row_mask, W_MODE, tl.float32)[:, None]
            x_hat = _rule_x_hat(eps_c_ptr, eps_u_ptr, momentum_ptr, delta_ptr, stats_ptr, offs,
                                mask, z, alpha, sigma, w, rows, row_mask, rescale, apg_eta,
                                apg_norm, GUIDED, RULE, HAS_MOMENTUM, HAS_DELTA, SPLIT)
        x_hat = _threshold(x_hat, clip, scale_ptr, rows, row_mask, THRESHOLD)
        if ONLY_X_HAT:
            tl.store(x_tmp_ptr + offs, x_hat, mask=mask)
        else:
            z_next = _z_next(z, x_hat, rows, row_mask, step, pid_d, offs, mask, table_ptr,
                             table_len, x_prev_ptr, x_prev2_ptr, x_prev3_ptr, noise_ptr, seed_ptr,
                             seed_value, ids_ptr, HISTORY, WIDTH, HAS_NOISE, SEED_MODE, HAS_IDS,
                             BLOCK_R, BLOCK_D)
            _store_z_next(out_ptr, copy_ptr, offs, mask, z_next, DOUBLED_OUT)
            _move_history(x_prev_ptr, x_prev2_ptr, x_prev3_ptr, offs, mask, HISTORY)
            if HISTORY >= 1:  # after x̂₁ was read (and moved back) from the same buffer
                tl.store(x_hat_ptr + offs, x_hat.to(x_hat_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _welford_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) summaries; empty sides allowed."""
    n = n_a + n_b
    spread = mean_b - mean_a
    share = tl.where(n > 0.0, n_b / tl.maximum(n, 1.0), 0.0)
    return n, mean_a + spread * share, m2_a + m2_b + spread * spread * n_a * share


@triton.jit
def _tile_summary(x, mask, n_b):
    """(mean, M2) of the masked tile x, along axis 1: (BLOCK_R,) each."""
    mean = tl.sum(x, axis=1) / tl.maximum(n_b, 1.0)
    spread = tl.where(mask, x - mean[:, None], 0.0)
    return mean, tl.sum(spread * spread, axis=1)


@triton.jit
def _store_partial(stats_ptr, rows, row_mask, split, slot: tl.constexpr, value,
                   SPLIT: tl.constexpr):
    """stats[row, slot, split] = value for each row (stats is [B, STAT_SLOTS, SPLIT])."""
    tl.store(stats_ptr + (rows.to(tl.int64) * _STAT_SLOTS + slot) * SPLIT + split, value,
             mask=row_mask)


@triton.jit
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
    _store_partial(stats_ptr, rows, row_mask, split, COUNT, n, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, MEAN_C, mean_c, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, M2_C, m2_c, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, MEAN_G, mean_g, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, M2_G, m2_g, SPLIT)


@triton.jit
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
    _store_partial(stats_ptr, rows, row_mask, split, DOT_CU, dot, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, DOT_UU, norm, SPLIT)


@triton.jit
def _apg_stats(eps_c_ptr, eps_u_ptr, z_ptr, momentum_ptr, stats_ptr, alpha, sigma, beta, rows,
               row_mask, start, stop, numel, split, HAS_MOMENTUM: tl.constexpr,
               READ_MOMENTUM: tl.constexpr, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    """m ← (D_c − D_u) + β·m over the slice [start, stop) of each row (stored when a momentum is
    kept), and the slice's ‖m‖², ⟨m, D_c⟩, ⟨D_c, D_c⟩."""
    mm = tl.zeros(rows.shape, tl.float32)
    md = tl.zeros(rows.shape, tl.float32)
    dd = tl.zeros(rows.shape, tl.float32)
    for begin in range(start, stop, BLOCK_D):
        mask, offs = _tile(rows, row_mask, begin + tl.arange(0, BLOCK_D), numel)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d_c = _data_prediction(z, eps_c_ptr, offs, mask, alpha, sigma)
        m = tl.where(mask, d_c - _data_prediction(z, eps_u_ptr, offs, mask, alpha, sigma), 0.0)
        d_c = tl.where(mask, d_c, 0.0)
        if READ_MOMENTUM:  # β ≠ 0; with β = 0 the old m is not read (m ← Δ)
            m += beta * tl.load(momentum_ptr + offs, mask=mask, other=0.0)
        if HAS_MOMENTUM:
            tl.store(momentum_ptr + offs, m, mask=mask)
        mm += tl.sum(m * m, axis=1)
        md += tl.sum(m * d_c, axis=1)
        dd += tl.sum(d_c * d_c, axis=1)
    _store_partial(stats_ptr, rows, row_mask, split, DOT_MM, mm, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, DOT_MD, md, SPLIT)
    _store_partial(stats_ptr, rows, row_mask, split, DOT_DD, dd, SPLIT)


@triton.jit(do_not_specialize=["step_value"])
def _row_stats_kernel(eps_c_ptr, eps_u_ptr, z_ptr, table_ptr, w_ptr, step_ptr, momentum_ptr,
                      stats_ptr, batch, numel, table_len, w_value, step_value, beta, chunk,
                      RULE: tl.constexpr, W_MODE: tl.constexpr, STEP_MODE: tl.constexpr,
                      HAS_MOMENTUM: tl.constexpr, READ_MOMENTUM: tl.constexpr,
                      WIDTH: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """The reduction pass (above): program (k, ·) reduces elements [k·chunk, (k + 1)·chunk) of
    its rows, rows strided by the grid's second axis."""
    split = tl.program_id(0)
    start = split * chunk
    stop = tl.minimum(start + chunk, numel)
    for row_block in range(tl.program_id(1), tl.cdiv(batch, BLOCK_R), tl.num_programs(1)):
        rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        row_mask = rows < batch
        if RULE == RULE_RESCALE:
            w = _per_row(w_ptr, w_value, rows, row_mask, W_MODE, tl.float32)[:, None]
            _rescale_stats(eps_c_ptr, eps_u_ptr, stats_ptr, w, rows, row_mask, start, stop,
                           numel, split, SPLIT, BLOCK_D)
        elif RULE == RULE_ZERO_STAR:
            _zero_star_stats(eps_c_ptr, eps_u_ptr, stats_ptr, rows, row_mask, start, stop, numel,
                             split, SPLIT, BLOCK_D)
        else:
            step = _per_row(step_ptr, step_value, rows, row_mask, STEP_MODE, tl.int64)
            alpha = _table_column(table_ptr, step, table_len, row_mask, ALPHA, float("nan"), WIDTH)
            sigma = _table_column(table_ptr, step, table_len, row_mask, SIGMA, 0.0, WIDTH)
            _apg_stats(eps_c_ptr, eps_u_ptr, z_ptr, momentum_ptr, stats_ptr, alpha, sigma, beta,
                       rows, row_mask, start, stop, numel, split, HAS_MOMENTUM, READ_MOMENTUM,
                       SPLIT, BLOCK_D)


