"""The step plan: a sampler's coefficient table on a λ grid and the per-row facts every loop needs.

Every row is x̂ = rule(z, ε), z' = c_z·z + c_x·x̂ + c_p·x̂_prev (+ c_p2·x̂₂ + c_p3·x̂₃) + s·n
(docs/design.md). A table is float32 [R, 6] (up to [R, 8] for samplers keeping older x̂) with rows
(α, σ, c_z, c_x, s, c_p, …), one row per network evaluation; with the final λ at +∞ the last row is
(α, σ, 0, 1, 0, 0) so that z' = x̂. A pipeline-exact schedule gives each row its own target λ
(`step_plan(..., targets=)`, ModelInfo.steps_to). At λ_0 = −∞ (α = 0, a flow model's start) a
row's (α, σ) are (1, 1): the net answers z − x̂ there (cfgengine.model). The samplers themselves are cfgengine/samplers.py's registry;
coefficients are computed in float64 from a float64 grid and rounded once.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import torch

from cfgengine.guidance import CFG
from cfgengine.samplers import (ALPHA, C_P, C_X, C_Z, NOISE, SIGMA,  # noqa: F401 (re-exported)
                                Rows, ancestral_coefficients, ddim_coefficients,
                                dpmpp_2m_coefficients, sampler_options, sampler_rows)
from cfgengine.samplers import SAMPLERS as SAMPLER_SPECS
from cfgengine.schedule import LOGSNR_RANGE, check_logsnr, check_logsnr_range, logsnr_grid

COLUMNS = C_P + 1  # the table of a sampler keeping at most the previous x̂


def grid_logsnr(steps: int | None, *, grid: str = "cosine",
                logsnr_range=LOGSNR_RANGE, logsnr: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 CPU λ grid a run uses: `logsnr` verbatim when given (then `steps` is None or
    its length), else `grid` with `steps` points on `logsnr_range`."""
    if logsnr is not None:
        lam = check_logsnr(logsnr)
        if steps is not None and steps != lam.numel():
            raise ValueError(f"steps = {steps!r} but logsnr holds {lam.numel()} values; "
                             "pass steps=None or its length")
        return lam
    if steps is None:
        raise ValueError("steps must be given unless logsnr is")
    return logsnr_grid(steps, *check_logsnr_range(logsnr_range), grid=grid)


SAMPLERS = tuple(SAMPLER_SPECS)
PURE_NOISE_SAMPLERS = ("ancestral", "ddim", "dpmpp_2m")  # VP steps that may start at α = 0


def sampler_plan_rows(logsnr: torch.Tensor, sampler: str, v: float | None, eta: float | None,
                      options: dict | None, final_logsnr: float,
                      targets: torch.Tensor | None = None) -> Rows:
    """The sampler's Rows, given the loops' common settings v and η (each passed on only to a
    sampler that takes it; None: the sampler's default), its own `options` and optionally each
    row's own target λ (`step_targets`). ValueError when the sampler cannot start at the grid's
    λ_0 = −∞."""
    check_sampler_args(logsnr.numel(), sampler, v, eta)
    logsnr = logsnr.double()
    if bool(torch.isneginf(logsnr[0])) and sampler not in PURE_NOISE_SAMPLERS:
        raise ValueError(f"sampler {sampler} cannot start at λ = -inf (α = 0, a flow model's "
                         f"first step); use {', '.join(PURE_NOISE_SAMPLERS)}, or a finite grid")
    known = SAMPLER_SPECS[sampler].options
    given = {name: value for name, value in (("v", v), ("eta", eta)) if name in known}
    return sampler_rows(sampler, logsnr, final_logsnr=final_logsnr,
                        targets=None if targets is None else step_targets(logsnr, targets),
                        **{**given, **(options or {})})


def step_targets(logsnr: torch.Tensor, targets) -> torch.Tensor:
    """Each row's own target λ as float64 [T], checked: finite (the last may be +∞, z' = x̂) and
    not below the λ the row starts at."""
    targets = torch.as_tensor(targets, dtype=torch.float64).reshape(-1)
    if targets.numel() != logsnr.numel():
        raise ValueError(f"targets holds {targets.numel()} values for {logsnr.numel()} steps")
    if not bool(torch.isfinite(targets[:-1]).all()) or bool(torch.isnan(targets[-1])) \
            or not bool((targets >= logsnr).all()):
        raise ValueError("each step's target λ must be finite (the last may be +inf) and not "
                         "below the λ the step starts at")
    return targets


def table_from_logsnr(logsnr: torch.Tensor, sampler: str = "ancestral", *, v: float = 0.3,
                      eta: float | None = None, options: dict | None = None,
                      final_logsnr: float = math.inf) -> torch.Tensor:
    """The float64 table [R, 6..8] of rows (α, σ, c_z, c_x, s, c_p, …) on the float64 grid
    `logsnr`. The last row steps to `final_logsnr`: +∞ (the default) makes it z' = x̂."""
    return sampler_plan_rows(logsnr, sampler, v, eta, options, final_logsnr).table


def coefficient_table(steps: int | None, sampler: str = "ancestral", *, v: float = 0.3,
                      eta: float | None = None, grid: str = "cosine", logsnr_range=LOGSNR_RANGE,
                      logsnr: torch.Tensor | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The sampler's table float32 [R, 6..8] of rows (α, σ, c_z, c_x, s, c_p, …) on `device`."""
    lam = grid_logsnr(steps, grid=grid, logsnr_range=logsnr_range, logsnr=logsnr)
    table = table_from_logsnr(lam, sampler, v=v, eta=eta)
    return table.to(device=device, dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class StepPlan:
    """Everything a sampling loop needs for one (sampler, grid, rule): the float64 table
    [R, 6..8] — R network evaluations — and the λ the net sees at each row (host), and per row on
    the host whether the net runs the doubled batch (2B rows: the rule guides this row) and
    whether the row draws no noise (s = 0; a row that draws uses key row + 1); `state` names the
    per-row buffers the sampler and the rule keep; `steps` is each row's grid step (a two-stage
    sampler has 2 rows per step). Every loop — the Sampler's,
    the CUDA graph's, the serving batch's and the bench's — runs from a StepPlan; none of them
    looks at a sampler's name or a table's width.

    `guided` says where the rule's w applies (its interval); `doubled` is the subset of those rows
    that run the null branch (all of them, except between CFG(refresh=k)'s refresh steps, where
    the step reuses the stored Δ). Outside `guided` a loop passes w = 0."""

    table: torch.Tensor
    logsnr: torch.Tensor
    doubled: tuple[bool, ...]
    quiet: tuple[bool, ...]
    state: tuple[str, ...]
    steps: tuple[int, ...] = ()
    guided: tuple[bool, ...] = ()
    _on: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.guided:  # a plan built without `guided`: w applies where the net doubles
            object.__setattr__(self, "guided", self.doubled)

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(table float32 [R, 6..8], λ float32 [R]) on `device`, copied once per device."""
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = (self.table.to(device, torch.float32),
                                self.logsnr.to(device, torch.float32))
        return self._on[device]

    def kinds(self) -> tuple[tuple[bool, bool], ...]:
        """(doubled, guided) per row: the kinds of step a captured loop replays."""
        return tuple(zip(self.doubled, self.guided))

    def unguided(self) -> "StepPlan":
        """The same plan with every row on B rows (w = 0 everywhere, or no labels)."""
        return replace(self, doubled=(False,) * self.rows, guided=(False,) * self.rows,
                       _on=self._on)


def step_plan(logsnr: torch.Tensor, sampler: str = "ancestral", *, v: float = 0.3,
              eta: float | None = None, options: dict | None = None, rule=None,
              final_logsnr: float = math.inf, targets: torch.Tensor | None = None) -> StepPlan:
    """The StepPlan of `sampler` (with `options`, cfgengine.samplers) on the float64 grid `logsnr`
    under guidance `rule` (a CFG, ZeroStar or APG config; None = CFG()): the rule's interval
    decides which rows are guided (by the λ each row's net sees), and of those CFG(refresh=k)
    doubles every k-th (counted from the first guided row, so the first guided row always stores
    a fresh Δ); the rule's per-row state (APG's momentum, the stored Δ) joins the sampler's x̂
    history. Each row steps to the next grid point and the last to `final_logsnr`, unless
    `targets` gives each row's own (ModelInfo.steps_to)."""
    rows = sampler_plan_rows(logsnr, sampler, v, eta, options, final_logsnr, targets)
    rule = CFG() if rule is None else rule
    interval = rule.interval
    guided = tuple(interval is None or interval[0] <= x <= interval[1]
                   for x in rows.logsnr.tolist())
    refresh = rule.refresh if isinstance(rule, CFG) else 1
    order = itertools.accumulate(guided)  # 1-based position among the guided rows
    doubled = tuple(g and (k - 1) % refresh == 0 for g, k in zip(guided, order))
    return StepPlan(rows.table, rows.logsnr, doubled, rows.quiet, rows.state + rule.row_state,
                    rows.steps, guided)


def check_sampler_args(steps: int, sampler: str, v: float | None, eta: float | None,
                       options: dict | None = None) -> None:
    """Raise ValueError naming the first bad sampler setting (v and η: numbers in [0, 1], or None
    for the sampler's default; `options`: the sampler's own, cfgengine.samplers)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer ≥ 2, got {steps!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    for name, value in (("v", v), ("eta", eta)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                      and 0 <= value <= 1):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"sampler_options must be a dict, got {type(options).__name__}")
    sampler_options(sampler, **(options or {}))
