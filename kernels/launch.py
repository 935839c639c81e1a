"""The launcher of the fused step kernels (kernels/triton_step.py): it checks what the kernels need
beyond the step's contract, picks the tile, and makes the one to three launches of a step.

Importing it imports Triton; kernels/step.py imports it only when a step runs on the kernels.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from cfgengine.guidance import APG, CFG, DynamicThreshold, ZeroStar
from cfgengine.kernels import triton_step
from cfgengine.kernels.contract import (RULE_APG, RULE_PLAIN, THRESHOLD_CLIP, THRESHOLD_NONE,
                                        THRESHOLD_SCALE, CounterNoise, RowState,
                                        check_kernel_operands, check_step_args, first_half,
                                        is_number, refreshes, rule_mode)
from cfgengine.kernels.reference import dynamic_threshold_scale

# triton.jit picks the interpreter when it decorates, so this is read once, at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TILE_ELEMENTS = 2048  # per program: 8 values per thread at 8 warps, two 16-byte fp32 vectors
# ptxas's own heuristic capped some 256-thread step specialisations at 64 registers and spilled
# 8–16 bytes (x̂ written at a 0-d step in bf16/fp16 on sm_90, the dpmpp term in fp32 on sm_80:
# `python -m cfgengine.kernels.aot`); 80 lets them fit and still runs 3 blocks of 256 threads per
# SM. The occupancy trade-off is unmeasured (no GPU yet): bench/gpu_check.py times it.
STEP_MAX_REGISTERS = 80
MAX_GRID_ROWS = 65535  # CUDA's limit on the grid's second axis; the kernels stride past it
MAX_SPLIT = 32  # slices per row in the reduction pass: ≥ 256 programs at B = 8 for a big D, and
                # the step kernel's SPLIT·STAT_SLOTS partial reads stay ~2% of a tile's bytes


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """One launch's tile (block_rows × block_d elements per program) and warps per program."""
    block_rows: int
    block_d: int
    num_warps: int


@dataclasses.dataclass(frozen=True)
class StepOperands:
    """One step's operands, checked, defaults filled in; `out` has B or 2B rows."""
    eps2: torch.Tensor
    z: torch.Tensor
    w: float | torch.Tensor
    table: torch.Tensor
    step: int | torch.Tensor
    rule: CFG | ZeroStar | APG
    clip: float | DynamicThreshold | None
    state: RowState
    noise: torch.Tensor | CounterNoise
    out: torch.Tensor

    @property
    def guided(self) -> bool:
        return self.eps2.shape[0] == 2 * self.z.shape[0]


def require_triton(device: torch.device) -> None:
    """Raise a RuntimeError that says how to run the kernel when it cannot run on `device`."""
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"impl='triton' on {device.type} tensors needs TRITON_INTERPRET=1 "
                           "set before the kernels are first used")


def guided_step_triton(eps2, z, w, table, step, *, rule=None, clip=None,
                       state: RowState | None = None,
                       noise: torch.Tensor | CounterNoise | None = None,
                       out: torch.Tensor | None = None,
                       config: LaunchConfig | None = None) -> torch.Tensor:
    """`guided_step(..., impl="triton")` with the tile given (`config`, None: `launch_config`)."""
    rule = CFG() if rule is None else rule
    check_step_args(eps2, z, w, table, step, rule=rule, clip=clip, state=state, noise=noise,
                    out=out, impl="triton")
    return launch_step(eps2, z, w, table, step, rule=rule, clip=clip, state=state, noise=noise,
                       out=out, config=config)


def launch_step(eps2, z, w, table, step, *, rule, clip, state: RowState | None,
                noise: torch.Tensor | CounterNoise | None, out: torch.Tensor | None,
                config: LaunchConfig | None = None) -> torch.Tensor:
    """The launches of one step on arguments that passed `check_step_args`: the reduction pass
    when the rule needs it, then the step; DynamicThreshold splits the step at x̂ around torch's
    per-sample quantile (docs/design.md: its cost). Returns z' (out[:B] when out is given)."""
    require_triton(z.device)
    state = RowState() if state is None else state
    noise = CounterNoise() if noise is None else noise
    check_kernel_operands(eps2, z, w, table, step, state=state, noise=noise, out=out)
    batch, numel = z.shape[0], z[0].numel()
    out = torch.empty_like(z) if out is None else out
    ops = StepOperands(eps2.contiguous(), z.contiguous(), w, table.contiguous(), step, rule, clip,
                       state, noise, out)  # the kernels read the table as rows of 6–8 floats
    config = config or launch_config(batch, numel)
    mode = rule_mode(ops.rule, ops.guided)
    stats, split = _launch_row_stats(ops, mode, config)
    if not isinstance(ops.clip, DynamicThreshold):
        _launch_step(ops, mode, stats, split, config)
        return first_half(out, batch)
    x_tmp = torch.empty(ops.z.shape, dtype=torch.float32, device=ops.z.device)
    _launch_step(ops, mode, stats, split, config, x_tmp=x_tmp)
    scale = dynamic_threshold_scale(x_tmp, ops.clip)  # (B,) fp32
    _launch_step(ops, mode, stats, split, config, x_tmp=x_tmp, scale=scale)
    return first_half(out, batch)


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
    return min(MAX_SPLIT, _next_power_of_2(_cdiv(numel, config.block_d)))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _row_grid(batch: int, config: LaunchConfig) -> int:
    """Programs along the grid's row axis: one per row block, strided past MAX_GRID_ROWS."""
    return min(_cdiv(batch, config.block_rows), MAX_GRID_ROWS)


def _row_operand(value, fallback: torch.Tensor, cast):
    """(mode, tensor, scalar) for the kernels' `_per_row` (OPERAND_*): a Python number, a
    one-element tensor, a row tensor. `fallback` stands in for the pointer a scalar leaves
    unread."""
    if not isinstance(value, torch.Tensor):
        return triton_step.OPERAND_SCALAR, fallback, cast(value)
    shared = value.numel() == 1
    mode = triton_step.OPERAND_SHARED if shared else triton_step.OPERAND_ROWS
    return mode, value.contiguous(), cast(0)


def _launch_row_stats(ops: StepOperands, mode: int, config: LaunchConfig):
    """The reduction pass: (stats [B, STAT_SLOTS, SPLIT] fp32, SPLIT); (z, 1) when not needed."""
    if mode == RULE_PLAIN:
        return ops.z, 1
    batch, numel = ops.z.shape[0], ops.z[0].numel()
    split = stats_split(numel, config)
    chunk = _cdiv(_cdiv(numel, config.block_d), split) * config.block_d
    stats = torch.empty(batch, triton_step.STAT_SLOTS, split, dtype=torch.float32,
                        device=ops.z.device)
    w_mode, w_ptr, w_value = _row_operand(ops.w, ops.z, float)
    step_mode, step_ptr, step_value = _row_operand(ops.step, ops.table, int)
    beta = ops.rule.momentum if mode == RULE_APG else 0.0
    momentum = ops.state.momentum
    triton_step._row_stats_kernel[(split, _row_grid(batch, config))](
        ops.eps2, ops.eps2[batch:], ops.z, ops.table, w_ptr, step_ptr, _or(momentum, ops.z),
        stats, batch, numel, ops.table.shape[0], w_value, step_value, float(beta), chunk,
        RULE=mode, W_MODE=w_mode, STEP_MODE=step_mode, HAS_MOMENTUM=momentum is not None,
        READ_MOMENTUM=beta != 0.0, WIDTH=ops.table.shape[1], SPLIT=split, BLOCK_R=config.block_rows,
        BLOCK_D=config.block_d, num_warps=config.num_warps)
    return stats, split


def _launch_step(ops: StepOperands, mode: int, stats: torch.Tensor, split: int,
                 config: LaunchConfig, *, x_tmp: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> None:
    """The step kernel: whole (no x_tmp), its first half (x_tmp alone: store x̂ unthresholded),
    or its second half (x_tmp and scale: x̂ read back, thresholded by `scale`)."""
    batch, numel = ops.z.shape[0], ops.z[0].numel()
    only_x_hat = x_tmp is not None and scale is None
    rule, state, out = ops.rule, ops.state, ops.out
    given = ops.noise if isinstance(ops.noise, torch.Tensor) else None
    counter = ops.noise if given is None else CounterNoise()
    w_mode, w_ptr, w_value = _row_operand(ops.w, ops.z, float)
    step_mode, step_ptr, step_value = _row_operand(ops.step, ops.table, int)
    seed_mode, seed_ptr, seed_value = _row_operand(counter.seed, ops.table, int)
    grid = (_cdiv(numel, config.block_d), _row_grid(batch, config))
    triton_step._guided_step_kernel[grid](
        ops.eps2, ops.eps2[batch:] if ops.guided else ops.eps2, ops.z, _or(given, ops.z),
        ops.table, w_ptr, step_ptr, seed_ptr, _or(counter.sample_ids, ops.table), stats,
        _or(state.momentum, ops.z), _or(state.delta, ops.z), *[_or(state.x_hat, ops.z)] * 2,
        _or(state.x_hat_2, ops.z), _or(state.x_hat_3, ops.z), _or(scale, ops.table),
        _or(x_tmp, ops.z), out, out[batch:] if out.shape[0] > batch else out,
        batch, numel, ops.table.shape[0], w_value, step_value, seed_value,
        float(ops.clip) if is_number(ops.clip) else 0.0,
        float(rule.rescale) if isinstance(rule, CFG) else 0.0,
        float(rule.eta) if isinstance(rule, APG) else 0.0,
        float(rule.norm_threshold) if isinstance(rule, APG) else 0.0,
        GUIDED=ops.guided, RULE=mode, HAS_MOMENTUM=mode == RULE_APG and state.momentum is not None,
        HAS_DELTA=refreshes(rule), W_MODE=w_mode, STEP_MODE=step_mode, SEED_MODE=seed_mode,
        HAS_IDS=counter.sample_ids is not None, HAS_NOISE=given is not None,
        HISTORY=sum(t is not None for t in state.history()), WIDTH=ops.table.shape[1],
        THRESHOLD=_threshold_mode(ops.clip, only_x_hat),
        LOAD_X_HAT=scale is not None, ONLY_X_HAT=only_x_hat, DOUBLED_OUT=out.shape[0] > batch,
        SPLIT=split, BLOCK_R=config.block_rows, BLOCK_D=config.block_d,
        num_warps=config.num_warps, maxnreg=STEP_MAX_REGISTERS)


def _threshold_mode(clip, only_x_hat: bool) -> int:
    """THRESHOLD for one launch: DynamicThreshold's first half stores x̂ unthresholded."""
    if clip is None or only_x_hat:
        return THRESHOLD_NONE
    return THRESHOLD_SCALE if isinstance(clip, DynamicThreshold) else THRESHOLD_CLIP


def _or(tensor: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """`tensor`, made contiguous, or `fallback` for a pointer the kernel's flags leave unread."""
    return fallback if tensor is None else tensor.contiguous()
