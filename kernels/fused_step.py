"""The guided sampling step: guidance mix (paper eq. 6) + posterior update + noise, in one pass.

    ε̃  = (1 + w_i)·ε_c − w_i·ε_u          (rows 0..B−1 of eps2 are ε_c, rows B..2B−1 are ε_u)
    x̂  = clip((z − σ·ε̃)/α)
    z' = c_z·z + c_x·x̂ + s·n               (α, σ, c_z, c_x, s) = table[step_i]

This module holds, in layers (docs/design.md §5): the torch reference `guided_step_reference` (the
definition, and the CPU path); the private Triton kernel `_guided_step_kernel`; its launcher
`guided_step_triton`, which checks the operands and picks the tile; and the public `guided_step`,
which dispatches. An eps2 of B rows (instead of 2B) means the guidance is already off (w = 0
everywhere, or unconditional sampling): ε̃ = eps2.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from cfgengine import rng
from cfgengine.guidance import guided_eps

try:  # Triton ships for Linux x86-64 only; elsewhere the torch path still works.
    import triton
    import triton.language as tl
    from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float
except ImportError:
    triton = tl = None

IMPLS = ("auto", "triton", "torch")
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# triton.jit picks the interpreter when it decorates, so this is read once, at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def guided_step(eps2: torch.Tensor, z: torch.Tensor, w: float | torch.Tensor, table: torch.Tensor,
                step: int | torch.Tensor, *, clip: float | None = None,
                noise: torch.Tensor | None = None, seed: int | torch.Tensor = 0,
                sample_ids: torch.Tensor | None = None, out: torch.Tensor | None = None,
                x_hat_out: torch.Tensor | None = None, out2: torch.Tensor | None = None,
                impl: str = "auto") -> torch.Tensor:
    """One sampler step for B rows; returns z' (written into `out` when given).

    `step` is an int, a 0-d int64 tensor, or an int64 Tensor[B]; noise is `noise` when given, else
    drawn at key (seed, sample_ids[i], step_i + 1). `out2` [2B, *S] receives z' in both halves;
    without `out`, the returned z' is the view out2[:B] (no third write).
    """
    check_step_args(eps2, z, w, table, step, noise, out, x_hat_out, out2, impl)
    if _use_triton(impl, z):
        _require_triton(z.device)
        check_kernel_operands(eps2, z, w, table, step, noise, seed, sample_ids, out, x_hat_out,
                              out2)
        return _launch(eps2, z, w, table, step, clip, noise, seed, sample_ids, out, x_hat_out,
                       out2, None)
    z_next, x_hat = guided_step_reference(eps2, z, w, table, step, clip=clip, noise=noise,
                                          seed=seed, sample_ids=sample_ids)
    return _write_outputs(z_next, x_hat, z.dtype, out, x_hat_out, out2)


def _use_triton(impl: str, z: torch.Tensor) -> bool:
    """impl "auto" takes the kernel on CUDA when Triton is installed; "triton" insists on it.

    On CPU "auto" stays the eager reference, measured against torch.compile of it
    (bench/results/step-cpu-*.json): compiled, a step runs 6–30× faster, but each dtype, shape
    and flag set compiles for 20–40 s (cold cache), which a CPU run earns back only after hundreds of steps
    of megabytes each — and every short run and test would pay it. A caller holding state across
    runs (the Sampler) is the place to opt into compiling.
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
        eps = guided_eps(eps_c, eps2[batch:].float(),
                         torch.as_tensor(w, dtype=torch.float32, device=z.device).reshape(-1))
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


# ---------------------------------------------------------------------------------------------
# The fused kernel. One program owns a tile of BLOCK_R rows × BLOCK_D elements of z and computes
#   (α, σ, c_z, c_x, s) = table[step_i]                      (NaN α when step_i is off the table)
#   ε̃  = ε_c + w_i·(ε_c − ε_u)       = (1 + w_i)·ε_c − w_i·ε_u, rounded as the reference does;
#                                      ε̃ = ε_c when GUIDED is off (eps2 has B rows)
#   x̂  = clip((z − σ·ε̃)/α)
#   z' = c_z·z + c_x·x̂ + s·n,  n = noise[i, j], or output j % 4 of Philox4x32-10 keyed by `seed`
#                                  at counter (j // 4, step_i + 1, id_i low, id_i high) (rng.py)
# in fp32, loading any storage dtype and rounding once per store. Traffic per element of z, in
# storage-dtype values: reads ε_c, ε_u, z (+ n when given) and writes z' (+ each out2 half that is
# not `out`, + x̂ when asked) — 4 values (5 with noise), the least the step can move. Rows whose
# s is 0 read no noise (masked load) and draw none (a device-side branch per tile).
# ---------------------------------------------------------------------------------------------


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
def _table_row(table_ptr, step, table_len, row_mask):
    """(α, σ, c_z, c_x, s) of each row's step as (BLOCK_R, 1) fp32. A step off the table gives
    α = NaN (so z' is NaN, not a read out of bounds) and s = 0."""
    valid = row_mask & (step >= 0) & (step < table_len)
    row = table_ptr + step * 5
    alpha = tl.load(row, mask=valid, other=float("nan"))
    sigma = tl.load(row + 1, mask=valid, other=0.0)
    c_z = tl.load(row + 2, mask=valid, other=0.0)
    c_x = tl.load(row + 3, mask=valid, other=0.0)
    s = tl.load(row + 4, mask=valid, other=0.0)
    return alpha[:, None], sigma[:, None], c_z[:, None], c_x[:, None], s[:, None]


@_jit()
def _guided_eps(eps_c_ptr, eps_u_ptr, offs, mask, w, GUIDED: tl.constexpr):
    """ε̃ = ε_c + w·(ε_c − ε_u) (paper eq. 6, in the reference's rounding); ε_c when not GUIDED."""
    eps = tl.load(eps_c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        eps_u = tl.load(eps_u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps = eps + w * (eps - eps_u)
    return eps


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


@_jit(do_not_specialize=["step_value", "seed_value"])
def _guided_step_kernel(eps_c_ptr, eps_u_ptr, z_ptr, noise_ptr, table_ptr, w_ptr, step_ptr,
                        seed_ptr, ids_ptr, out_ptr, copy1_ptr, copy2_ptr, x_hat_ptr,
                        batch, numel, table_len, w_value, step_value, seed_value, clip,
                        GUIDED: tl.constexpr, W_MODE: tl.constexpr, STEP_MODE: tl.constexpr,
                        SEED_MODE: tl.constexpr, HAS_IDS: tl.constexpr, HAS_NOISE: tl.constexpr,
                        CLIP: tl.constexpr, N_COPIES: tl.constexpr, WRITE_X_HAT: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The fused step (formula above) over a grid (blocks of D, blocks of rows), rows strided by
    the grid's second axis so any B fits CUDA's 65535 limit on it."""
    pid_d = tl.program_id(0)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) element index j within a row
    for row_block in range(tl.program_id(1), tl.cdiv(batch, BLOCK_R), tl.num_programs(1)):
        rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        row_mask = rows < batch
        mask = row_mask[:, None] & (cols < numel)[None, :]
        offs = rows.to(tl.int64)[:, None] * numel + cols[None, :]  # int64: B·D may pass 2³¹
        step = _per_row(step_ptr, step_value, rows, row_mask, STEP_MODE, tl.int64)
        alpha, sigma, c_z, c_x, s = _table_row(table_ptr, step, table_len, row_mask)
        w = _per_row(w_ptr, w_value, rows, row_mask, W_MODE, tl.float32)[:, None]
        eps = _guided_eps(eps_c_ptr, eps_u_ptr, offs, mask, w, GUIDED)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x_hat = (z - sigma * eps) / alpha
        if CLIP:
            x_hat = tl.clamp(x_hat, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
        if WRITE_X_HAT:
            tl.store(x_hat_ptr + offs, x_hat.to(x_hat_ptr.dtype.element_ty), mask=mask)
        seed = _per_row(seed_ptr, seed_value, rows, row_mask, SEED_MODE, tl.int64)
        if HAS_IDS:
            sample_id = _per_row(ids_ptr, 0, rows, row_mask, 2, tl.int64)
        else:  # the default ids 0..B−1, without a tensor allocated per step
            sample_id = rows.to(tl.int64)
        z_next = _add_noise(c_z * z + c_x * x_hat, s, noise_ptr, offs, mask, seed, step + 1,
                            sample_id, pid_d, HAS_NOISE, BLOCK_R, BLOCK_D)
        _store_z_next(out_ptr, copy1_ptr, copy2_ptr, offs, mask, z_next, N_COPIES)


# ---------------------------------------------------------------------------------------------
# The launcher.
# ---------------------------------------------------------------------------------------------

TILE_ELEMENTS = 2048  # per program: 8 values per thread at 8 warps, two 16-byte fp32 vectors
MAX_GRID_ROWS = 65535  # CUDA's limit on the grid's second axis; the kernel strides past it


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """One launch's tile (block_rows × block_d elements per program) and warps per program."""
    block_rows: int
    block_d: int
    num_warps: int


def launch_config(batch: int, numel: int) -> LaunchConfig:
    """Tiles of about TILE_ELEMENTS: a segment of one row when D is large, several rows when D is
    small (toy 2-d samples), so every program moves the same bytes. block_d ≥ 16 keeps it a
    multiple of the 4 Philox outputs. No autotuning: the step is bandwidth-bound and this is
    deterministic."""
    block_d = max(16, min(_next_power_of_2(numel), TILE_ELEMENTS))
    block_rows = max(1, min(_next_power_of_2(batch), TILE_ELEMENTS // block_d))
    num_warps = 8 if block_rows * block_d >= 2048 else 4
    return LaunchConfig(block_rows, block_d, num_warps)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _row_operand(value, fallback: torch.Tensor, cast):
    """(mode, tensor, scalar) for `_per_row`: 0 a Python number, 1 a one-element tensor, 2 a row
    tensor. `fallback` stands in for the pointer a scalar does not use."""
    if not isinstance(value, torch.Tensor):
        return 0, fallback, cast(value)
    return (1 if value.numel() == 1 else 2), value.contiguous(), cast(0)


def guided_step_triton(eps2: torch.Tensor, z: torch.Tensor, w: float | torch.Tensor,
                       table: torch.Tensor, step: int | torch.Tensor, *, clip: float | None = None,
                       noise: torch.Tensor | None = None, seed: int | torch.Tensor = 0,
                       sample_ids: torch.Tensor | None = None, out: torch.Tensor | None = None,
                       x_hat_out: torch.Tensor | None = None, out2: torch.Tensor | None = None,
                       config: LaunchConfig | None = None) -> torch.Tensor:
    """Launch the fused kernel for `guided_step` (same arguments; `config` overrides the tile)."""
    _require_triton(z.device)
    check_step_args(eps2, z, w, table, step, noise, out, x_hat_out, out2, "triton")
    check_kernel_operands(eps2, z, w, table, step, noise, seed, sample_ids, out, x_hat_out, out2)
    return _launch(eps2, z, w, table, step, clip, noise, seed, sample_ids, out, x_hat_out, out2,
                   config)


def _launch(eps2, z, w, table, step, clip, noise, seed, sample_ids, out, x_hat_out, out2,
            config: LaunchConfig | None) -> torch.Tensor:
    """The launch itself, on operands already checked (each step validates once)."""
    batch, numel = z.shape[0], z[0].numel()
    if out is None:
        out = out2[:batch] if out2 is not None else torch.empty_like(z)
    dests = _destinations(out, out2)
    config = config or launch_config(batch, numel)
    eps2, z, table = eps2.contiguous(), z.contiguous(), table.contiguous()  # rows of 5 floats
    w_mode, w_ptr, w_value = _row_operand(w, z, float)
    step_mode, step_ptr, step_value = _row_operand(step, table, int)
    seed_mode, seed_ptr, seed_value = _row_operand(seed, table, int)
    grid = (triton.cdiv(numel, config.block_d),
            min(triton.cdiv(batch, config.block_rows), MAX_GRID_ROWS))
    _guided_step_kernel[grid](
        eps2, eps2[batch:] if eps2.shape[0] == 2 * batch else eps2, z, _or(noise, z), table,
        w_ptr, step_ptr, seed_ptr, _or(sample_ids, table), *(dests + [out] * (3 - len(dests))),
        _or(x_hat_out, z), batch, numel, table.shape[0], w_value, step_value, seed_value,
        float(clip or 0.0), GUIDED=eps2.shape[0] == 2 * batch, W_MODE=w_mode, STEP_MODE=step_mode,
        SEED_MODE=seed_mode, HAS_IDS=sample_ids is not None, HAS_NOISE=noise is not None,
        CLIP=clip is not None, N_COPIES=len(dests) - 1, WRITE_X_HAT=x_hat_out is not None,
        BLOCK_R=config.block_rows, BLOCK_D=config.block_d, num_warps=config.num_warps)
    return out


def _or(tensor: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """`tensor`, made contiguous, or `fallback` for a pointer the kernel's flags leave unread."""
    return fallback if tensor is None else tensor.contiguous()


def check_kernel_operands(eps2, z, w, table, step, noise, seed, sample_ids, out, x_hat_out,
                          out2) -> None:
    """What the kernel needs beyond `check_step_args`: one device, float storage, integer steps,
    seeds and ids, contiguous outputs, rows under 2³¹ elements. Raises ValueError."""
    tensors = dict(eps2=eps2, z=z, w=w, table=table, step=step, noise=noise, seed=seed,
                   sample_ids=sample_ids, out=out, x_hat_out=x_hat_out, out2=out2)
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != z.device:
            raise ValueError(f"{name} is on {t.device}, z on {z.device}")
    for name in ("eps2", "z", "noise", "out", "x_hat_out", "out2"):
        t = tensors[name]
        if t is not None and t.dtype not in STORAGE_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    for name in ("out", "x_hat_out", "out2"):
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
