"""Coefficient tables for the paper's ancestral sampler (Algorithm 2, v), DDIM (η) and
DPM-Solver++(2M) — pure functions of a λ grid.

Every step is x̂ = rule(z, ε), z' = c_z·z + c_x·x̂ + c_p·x̂_prev + s·n (docs/design.md). A table is
float32 [T, 6] with rows (α, σ, c_z, c_x, s, c_p) at λ_t; c_p multiplies the previous step's x̂
(only DPM-Solver++(2M) uses it); the last row is (α, σ, 0, 1, 0, 0) so that z' = x̂.
Coefficients are computed in float64 from a float64 grid and rounded once.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from cfgengine.guidance import CFG
from cfgengine.schedule import (LOGSNR_RANGE, alpha_sigma, check_logsnr, check_logsnr_range,
                                logsnr_grid)

ALPHA, SIGMA, C_Z, C_X, NOISE, C_P = range(6)
COLUMNS = 6


def ancestral_coefficients(logsnr: torch.Tensor, v: float = 0.3):
    """Algorithm 2 between consecutive grid points: μ = r·(α'/α)·z + (1 − r)·α'·x̂,
    var = ((1 − r)·σ'²)^(1−v) · ((1 − r)·σ²)^v, r = e^(λ − λ'). Returns (c_z, c_x, s) for t < T−1."""
    lam, lam_next = logsnr[:-1], logsnr[1:]
    alpha, sigma = alpha_sigma(lam)
    alpha_next, sigma_next = alpha_sigma(lam_next)
    r = torch.exp(lam - lam_next)
    one_minus_r = -torch.expm1(lam - lam_next)
    c_z = r * alpha_next / alpha
    c_x = one_minus_r * alpha_next
    var = (one_minus_r * sigma_next**2) ** (1 - v) * (one_minus_r * sigma**2) ** v
    return c_z, c_x, var.sqrt()


def ddim_coefficients(logsnr: torch.Tensor, eta: float = 0.0):
    """DDIM: s = η·(σ'/σ)·√(1 − α²/α'²), c_z = √(σ'² − s²)/σ, c_x = α' − α·c_z (ε re-derived from
    the clipped x̂). Returns (c_z, c_x, s) for t < T−1."""
    alpha, sigma = alpha_sigma(logsnr[:-1])
    alpha_next, sigma_next = alpha_sigma(logsnr[1:])
    s = eta * (sigma_next / sigma) * torch.sqrt(1 - alpha**2 / alpha_next**2)
    c_z = torch.sqrt(sigma_next**2 - s**2) / sigma
    c_x = alpha_next - alpha * c_z
    return c_z, c_x, s


def dpmpp_2m_coefficients(logsnr: torch.Tensor):
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2; k-diffusion's `sample_dpmpp_2m` with t = λ/2):
    h_t = (λ_{t+1} − λ_t)/2, z' = (σ'/σ)·z + α'·(1 − e^(−h))·D, D = (1 + 1/(2r))·x̂ − x̂_prev/(2r),
    r = h_{t−1}/h_t; first order (D = x̂, i.e. DDIM η = 0) on the first step and on the step into
    the last grid point, whose long last interval would otherwise overshoot. Returns
    (c_z, c_x, s, c_p) for t < T−1."""
    sigma = alpha_sigma(logsnr[:-1])[1]
    alpha_next, sigma_next = alpha_sigma(logsnr[1:])
    h = (logsnr[1:] - logsnr[:-1]) / 2  # (T−1,)
    gain = alpha_next * -torch.expm1(-h)  # α'·(1 − e^(−h))
    half_inv_r = torch.zeros_like(h)  # 1/(2r); 0 keeps the first-order steps
    half_inv_r[1:-1] = h[1:-1] / (2 * h[:-2])
    c_p = 0.0 - gain * half_inv_r  # 0.0 − …: +0, not −0, on first-order steps
    return sigma_next / sigma, gain * (1 + half_inv_r), torch.zeros_like(h), c_p


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


@dataclass(frozen=True)
class SamplerKind:
    """A sampler as the step sees it: `coefficients(λ_ext, settings)` gives float64 columns
    (c_z, c_x, s, c_p) for each interval of the extended grid λ_ext (the grid plus, when finite,
    the final λ), and `state` names the per-row buffers it keeps between steps."""

    name: str
    coefficients: Callable[..., tuple[torch.Tensor, ...]]
    state: tuple[str, ...] = ()


def _ancestral(lam, v, eta):
    c_z, c_x, s = ancestral_coefficients(lam, v)
    return c_z, c_x, s, torch.zeros_like(s)


def _ddim(lam, v, eta):
    c_z, c_x, s = ddim_coefficients(lam, eta)
    return c_z, c_x, s, torch.zeros_like(s)


def _dpmpp_2m(lam, v, eta):
    return dpmpp_2m_coefficients(lam)


SAMPLER_KINDS: dict[str, SamplerKind] = {
    "ancestral": SamplerKind("ancestral", _ancestral),
    "ddim": SamplerKind("ddim", _ddim),
    "dpmpp_2m": SamplerKind("dpmpp_2m", _dpmpp_2m, state=("x_hat",)),
}
SAMPLERS = tuple(SAMPLER_KINDS)


def table_from_logsnr(logsnr: torch.Tensor, sampler: str = "ancestral", *, v: float = 0.3,
                      eta: float = 0.0, final_logsnr: float = math.inf) -> torch.Tensor:
    """The float64 table [T, 6] of rows (α, σ, c_z, c_x, s, c_p) on the float64 grid `logsnr`.
    The last row steps to `final_logsnr`: +∞ (the default) makes it z' = x̂."""
    check_sampler_args(logsnr.numel(), sampler, v, eta)
    logsnr = logsnr.double()
    alpha, sigma = alpha_sigma(logsnr)
    finite = math.isfinite(final_logsnr)
    lam = torch.cat([logsnr, logsnr.new_tensor([final_logsnr])]) if finite else logsnr
    columns = torch.stack(SAMPLER_KINDS[sampler].coefficients(lam, v, eta), dim=1)
    if not finite:
        last = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)  # z' = x̂
        columns = torch.cat([columns, last], dim=0)  # (T, 4)
    return torch.cat([torch.stack([alpha, sigma], dim=1), columns], dim=1)  # (T, 6)


def coefficient_table(steps: int | None, sampler: str = "ancestral", *, v: float = 0.3,
                      eta: float = 0.0, grid: str = "cosine", logsnr_range=LOGSNR_RANGE,
                      logsnr: torch.Tensor | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The sampler's table float32 [T, 6] of rows (α, σ, c_z, c_x, s, c_p), built on `device`."""
    lam = grid_logsnr(steps, grid=grid, logsnr_range=logsnr_range, logsnr=logsnr)
    table = table_from_logsnr(lam, sampler, v=v, eta=eta)
    return table.to(device=device, dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class StepPlan:
    """Everything a sampling loop needs for one (sampler, grid, rule): the float64 table [R, 6]
    and the λ the net sees at each row (host), and per row on the host whether the net runs the
    doubled batch (2B rows: the rule guides this step) and whether the row draws no noise (s = 0);
    `state` names the per-row buffers the sampler and the rule keep. Every loop — the Sampler's,
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
    guided: tuple[bool, ...] = ()
    _on: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.guided:  # a plan built without `guided`: w applies where the net doubles
            object.__setattr__(self, "guided", self.doubled)

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(table float32 [R, 6], λ float32 [R]) on `device`, copied once per device."""
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
              eta: float = 0.0, rule=None, final_logsnr: float = math.inf) -> StepPlan:
    """The StepPlan of `sampler` on the float64 grid `logsnr` under guidance `rule` (a CFG,
    ZeroStar or APG config; None = CFG()): the rule's interval decides which rows are guided, and
    of those CFG(refresh=k) doubles every k-th (counted from the first guided row, so the first
    guided step always stores a fresh Δ); the rule's per-row state (APG's momentum, the stored Δ)
    joins the sampler's."""
    lam = logsnr.double()
    table = table_from_logsnr(lam, sampler, v=v, eta=eta, final_logsnr=final_logsnr)
    rule = CFG() if rule is None else rule
    interval = rule.interval
    guided = tuple(interval is None or interval[0] <= x <= interval[1] for x in lam.tolist())
    refresh = rule.refresh if isinstance(rule, CFG) else 1
    order = itertools.accumulate(guided)  # 1-based position among the guided rows
    doubled = tuple(g and (k - 1) % refresh == 0 for g, k in zip(guided, order))
    quiet = tuple(s == 0 for s in table[:, NOISE].tolist())
    state = SAMPLER_KINDS[sampler].state + rule.row_state
    return StepPlan(table, lam, doubled, quiet, state, guided)


def check_sampler_args(steps: int, sampler: str, v: float, eta: float) -> None:
    """Raise ValueError naming the first bad sampler setting."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer ≥ 2, got {steps!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    for name, value in (("v", v), ("eta", eta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
