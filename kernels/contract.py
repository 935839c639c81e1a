"""The guided step's contract: its constants, its operand types and the checks every path runs.

    ε̃  = rule(ε_c, ε_u, w_i)             (rows 0..B−1 of eps2 are ε_c, rows B..2B−1 are ε_u)
    x̂  = threshold((z − σ·ε̃)/α)          (APG forms x̂ directly in x̂ space)
    z' = c_z·z + c_x·x̂ + c_p·x̂₁ + c_p2·x̂₂ + c_p3·x̂₃ + s·n
         (α, σ, c_z, c_x, s, c_p[, c_p2[, c_p3]]) = table[step_i]

x̂_k is the x̂ of k steps back (state.x_hat, x_hat_2, x_hat_3); a table of 6 columns has c_p only.

An eps2 of B rows (instead of 2B) means the null branch did not run at this step (w = 0
everywhere, unconditional sampling, or a step outside the rule's interval): ε̃ = ε_c whatever the
rule, and APG's momentum is left as it is — except under CFG(refresh=k), which keeps Δ = ε_c − ε_u
per row (state.delta, stored on the steps with 2B rows) and on B rows takes ε̃ = ε_c + w_i·Δ (the
caller passes w = 0 outside the interval). Nothing here imports Triton.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from cfgengine import rng
from cfgengine.guidance import APG, CFG, RULES, DynamicThreshold, ZeroStar
from cfgengine.samplers import (ALPHA, C_P, C_P2, C_P3, C_X, C_Z,  # noqa: F401 (the columns)
                                NOISE, SIGMA)

MIN_COLUMNS, MAX_COLUMNS = C_P + 1, C_P3 + 1  # (…, c_p) up to (…, c_p, c_p2, c_p3)

IMPLS = ("auto", "triton", "torch")
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ZERO_STAR_EPS = 1e-8  # CFG-Zero*'s guard on ⟨ε_u, ε_u⟩ (diffusers `cfg_zero_star_scale`)
APG_NORM_FLOOR = 1e-24  # ⟨D_c, D_c⟩ floor: torch's normalize clamps ‖D_c‖ at 1e-12

# The kernels' RULE: plain eq. 6 (also every unguided step), CFG with rescale, CFG-Zero*, APG.
RULE_PLAIN, RULE_RESCALE, RULE_ZERO_STAR, RULE_APG = range(4)
# The kernels' THRESHOLD: none, clamp to ±c, or clamp to ±s_i and divide by s_i (dynamic).
THRESHOLD_NONE, THRESHOLD_CLIP, THRESHOLD_SCALE = range(3)


@dataclasses.dataclass
class RowState:
    """The per-row state a sampler and rule keep across steps, each fp32 [B, *S] or None (not
    kept). `momentum`: APG's m, updated in place on guided steps. `x_hat`, `x_hat_2`, `x_hat_3`:
    the x̂ of 1, 2 and 3 steps back (a prefix of them is kept), read where c_p, c_p2, c_p3 ≠ 0;
    after the step the history moves one back (x_hat_3 ← x_hat_2 ← x_hat) and x_hat holds this
    step's x̂ — in place, so one captured step replays at every step and rows at different steps
    share a call. `delta`: CFG(refresh=k)'s Δ = ε_c − ε_u, written on steps with 2B rows and read
    on steps with B rows.

    New kinds of state are new fields defaulting to None, so callers that do not keep them are
    untouched; `zeros_like` and `rows` work on every field."""
    momentum: torch.Tensor | None = None
    x_hat: torch.Tensor | None = None
    x_hat_2: torch.Tensor | None = None
    x_hat_3: torch.Tensor | None = None
    delta: torch.Tensor | None = None

    @classmethod
    def zeros_like(cls, z: torch.Tensor, names) -> "RowState":
        """fp32 zeros shaped like `z` for each field named in `names` (the others None)."""
        unknown = set(names) - set(cls.names())
        if unknown:
            raise ValueError(f"RowState has no field {sorted(unknown)}; fields: {cls.names()}")
        return cls(**{name: torch.zeros(z.shape, dtype=torch.float32, device=z.device)
                      for name in names})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def kept(self) -> dict[str, torch.Tensor]:
        """The fields that are kept, by name."""
        return {name: getattr(self, name) for name in self.names()
                if getattr(self, name) is not None}

    def history(self) -> tuple[torch.Tensor | None, ...]:
        """(x̂₁, x̂₂, x̂₃): the x̂ of 1, 2, 3 steps back, None where not kept."""
        return self.x_hat, self.x_hat_2, self.x_hat_3

    def push(self, x_hat: torch.Tensor) -> None:
        """Move the kept x̂ history one step back and keep `x_hat` as the last step's."""
        kept = [t for t in self.history() if t is not None]
        for newer, older in reversed(list(zip(kept, kept[1:]))):
            older.copy_(newer)
        if kept:
            kept[0].copy_(x_hat)

    def zero_(self) -> "RowState":
        """Every kept buffer set to 0 in place (a new chunk of rows starts from zero state)."""
        for buffer in self.kept().values():
            buffer.zero_()
        return self

    def rows(self, index) -> "RowState":
        """The state of some rows (a slice gives views, updated in place by a step on them)."""
        return RowState(**{name: t[index] for name, t in self.kept().items()})


@dataclasses.dataclass(frozen=True)
class CounterNoise:
    """Noise drawn at key (seed, sample_ids[i], step_i + 1) (cfgengine.rng; in-kernel on CUDA).
    `seed` is an int or a 0-d int64 tensor (a CUDA graph refills it); sample_ids None means
    0..B−1."""
    seed: int | torch.Tensor = 0
    sample_ids: torch.Tensor | None = None


def first_half(out: torch.Tensor, batch: int) -> torch.Tensor:
    """z' as the step returns it: `out` itself, or rows 0..B−1 of a 2B-row `out`."""
    return out if out.shape[0] == batch else out[:batch]


def table_rows(table: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """The coefficient rows for each row, float32 (B or 1, 6), without a host sync."""
    if isinstance(step, torch.Tensor):
        return table.index_select(0, step.reshape(-1).to(torch.int64))
    return table[step : step + 1]


def check_step_args(eps2, z, w, table, step, *, rule=None, clip=None, state=None, noise=None,
                    out=None, impl: str = "auto") -> None:
    """Shape/dtype contract of `guided_step`; raises ValueError naming the first violation."""
    batch, sample_shape = z.shape[0], tuple(z.shape[1:])
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if eps2.shape[0] not in (batch, 2 * batch) or tuple(eps2.shape[1:]) != sample_shape:
        raise ValueError(f"eps2 must be [2B, *S] = [{2 * batch}, {sample_shape}] for z of shape "
                         f"{tuple(z.shape)}, got {tuple(eps2.shape)}")
    if table.dim() != 2 or not MIN_COLUMNS <= table.shape[1] <= MAX_COLUMNS \
            or table.dtype != torch.float32:
        raise ValueError(f"table must be float32 [T, {MIN_COLUMNS}] (α, σ, c_z, c_x, s, c_p), or "
                         f"up to [T, {MAX_COLUMNS}] with c_p2, c_p3; got {table.dtype} "
                         f"{tuple(table.shape)}")
    if isinstance(step, int) and not 0 <= step < table.shape[0]:
        raise ValueError(f"step {step} is outside the table's {table.shape[0]} rows")
    if isinstance(step, torch.Tensor) and step.numel() not in (1, batch):
        raise ValueError(f"step must be an int, a 0-d tensor or a Tensor[{batch}]")
    if isinstance(w, torch.Tensor) and w.numel() not in (1, batch):
        raise ValueError(f"w must be a float or a Tensor[{batch}], got shape {tuple(w.shape)}")
    if out is not None and (out.shape[0] not in (batch, 2 * batch)
                            or tuple(out.shape[1:]) != sample_shape):
        raise ValueError(f"out must have shape [{batch} or {2 * batch}, {sample_shape}], "
                         f"got {tuple(out.shape)}")
    rows = dict(_state_fields(state))
    if isinstance(noise, torch.Tensor):
        rows["noise"] = noise
    elif not (noise is None or isinstance(noise, CounterNoise)):
        raise ValueError(f"noise must be a Tensor, a CounterNoise or None, got {noise!r}")
    for name, t in rows.items():
        if t.shape[0] != batch or tuple(t.shape[1:]) != sample_shape:
            raise ValueError(f"{name} must have shape [{batch}, {sample_shape}], "
                             f"got {tuple(t.shape)}")
    check_rule_args(rule, state, clip)


def _state_fields(state: RowState | None) -> list[tuple[str, torch.Tensor]]:
    """("state.<field>", tensor) for each kept field."""
    if state is None:
        return []
    if not isinstance(state, RowState):
        raise ValueError(f"state must be a RowState or None, got {type(state).__name__}")
    kept = [t is not None for t in state.history()]
    if kept != sorted(kept, reverse=True):
        raise ValueError("state keeps x̂ history with a gap: x_hat_2 needs x_hat, x_hat_3 "
                         "needs x_hat_2")
    return [(f"state.{name}", t) for name, t in state.kept().items()]


def check_rule_args(rule, state: RowState | None, clip) -> None:
    """The rule is one of cfgengine.guidance's; APG with momentum keeps an fp32 state.momentum;
    `clip` is None, a positive number or a DynamicThreshold."""
    if rule is not None and not isinstance(rule, RULES):
        raise ValueError(f"rule must be one of {', '.join(r.__name__ for r in RULES)}, "
                         f"got {rule!r}")
    momentum = None if state is None else state.momentum
    if isinstance(rule, APG) and rule.momentum != 0.0 and momentum is None:
        raise ValueError("APG with momentum needs state=RowState(momentum=...) (an fp32 "
                         "[B, *S] buffer, zeros at first)")
    if momentum is not None and momentum.dtype != torch.float32:
        raise ValueError(f"state.momentum must be float32, got {momentum.dtype}")
    delta = None if state is None else state.delta
    if refreshes(rule) and delta is None:
        raise ValueError("CFG(refresh > 1) needs state=RowState(delta=...) (an fp32 [B, *S] "
                         "buffer, zeros at first)")
    if delta is not None and delta.dtype != torch.float32:
        raise ValueError(f"state.delta must be float32, got {delta.dtype}")
    if not (clip is None or isinstance(clip, DynamicThreshold)
            or (is_number(clip) and math.isfinite(clip) and clip > 0)):
        raise ValueError(f"clip must be None, a positive number or a DynamicThreshold, "
                         f"got {clip!r}")


def refreshes(rule) -> bool:
    """Whether the rule keeps Δ between steps (CFG with refresh > 1)."""
    return isinstance(rule, CFG) and rule.refresh > 1


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_kernel_operands(eps2, z, w, table, step, *, state: RowState | None,
                          noise: torch.Tensor | CounterNoise, out) -> None:
    """What the kernel needs beyond `check_step_args`: one device, float storage, integer steps,
    seeds and ids, contiguous outputs and state, rows under 2³¹ elements. Raises ValueError."""
    counter = noise if isinstance(noise, CounterNoise) else CounterNoise()
    fields = dict(_state_fields(state))
    tensors = dict(eps2=eps2, z=z, w=w, table=table, step=step, seed=counter.seed,
                   sample_ids=counter.sample_ids, out=out, **fields,
                   noise=noise if isinstance(noise, torch.Tensor) else None)
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != z.device:
            raise ValueError(f"{name} is on {t.device}, z on {z.device}")
    for name in ("eps2", "z", "noise", "out", "state.x_hat", "state.x_hat_2", "state.x_hat_3"):
        t = tensors.get(name)
        if t is not None and t.dtype not in STORAGE_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    for name in ("out", *fields):
        if tensors[name] is not None and not tensors[name].is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel writes it in place)")
    _check_index_operands(z.shape[0], w, step, counter)
    if z[0].numel() >= 2**31:
        raise ValueError(f"a sample has {z[0].numel()} elements; the kernel indexes rows in int32")


def _check_index_operands(batch, w, step, counter: CounterNoise) -> None:
    """Dtypes and sizes of the per-row operands: float w, integer step/seed, int64 sample ids."""
    seed, sample_ids = counter.seed, counter.sample_ids
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


def rule_mode(rule: CFG | ZeroStar | APG, guided: bool) -> int:
    """The kernels' RULE for a step: every unguided step is plain."""
    if not guided:
        return RULE_PLAIN
    if isinstance(rule, APG):
        return RULE_APG
    if isinstance(rule, ZeroStar):
        return RULE_ZERO_STAR
    return RULE_RESCALE if rule.rescale > 0.0 else RULE_PLAIN
