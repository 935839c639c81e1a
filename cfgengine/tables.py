"""Coefficient tables for the paper's ancestral sampler (Algorithm 2, v), DDIM (η) and
DPM-Solver++(2M) — pure functions of a λ grid.

Every step is x̂ = rule(z, ε), z' = c_z·z + c_x·x̂ + c_p·x̂_prev + s·n (docs/design.md). A table is
float32 [T, 6] with rows (α, σ, c_z, c_x, s, c_p); row t reads x̂ = (z − σ·ε)/α at λ_t (the λ the
net sees) and steps to its target λ'_t: by default the next grid point, and from the last row the
model's final λ (+∞: the row is (α, σ, 0, 1, 0, 0), z' = x̂); a pipeline-exact schedule gives its
own targets (docs/models.md). c_p multiplies the previous step's x̂ (only DPM-Solver++(2M) uses it).
At λ = −∞ (α = 0, a flow model's first step) ε carries no x̂: the net answers z − x̂ there and the
row's (α, σ) are (1, 1) (`prediction_alpha_sigma`, cfgengine.model).
Coefficients are computed in float64 from a float64 grid and rounded once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from cfgengine.guidance import CFG
from cfgengine.schedule import (LOGSNR_RANGE, alpha_sigma, check_logsnr, check_logsnr_range,
                                logsnr_grid)

ALPHA, SIGMA, C_Z, C_X, NOISE, C_P = range(6)
COLUMNS = 6


def ancestral_coefficients(lam: torch.Tensor, lam_next: torch.Tensor, v: float = 0.3):
    """Algorithm 2 from λ to λ' (elementwise): μ = r·(α'/α)·z + (1 − r)·α'·x̂,
    var = ((1 − r)·σ'²)^(1−v) · ((1 − r)·σ²)^v, r = e^(λ − λ'); r/α → 0 as λ → −∞ (α = 0).
    Returns (c_z, c_x, s)."""
    alpha, sigma = alpha_sigma(lam)
    alpha_next, sigma_next = alpha_sigma(lam_next)
    r = torch.exp(lam - lam_next)
    one_minus_r = -torch.expm1(lam - lam_next)
    c_z = torch.where(alpha > 0, r * alpha_next / alpha, 0.0)
    c_x = one_minus_r * alpha_next
    var = (one_minus_r * sigma_next**2) ** (1 - v) * (one_minus_r * sigma**2) ** v
    return c_z, c_x, var.sqrt()


def ddim_coefficients(lam: torch.Tensor, lam_next: torch.Tensor, eta: float = 0.0):
    """DDIM from λ to λ': s = η·(σ'/σ)·√(1 − α²/α'²), c_z = √(σ'² − s²)/σ, c_x = α' − α·c_z (ε
    re-derived from the clipped x̂). Returns (c_z, c_x, s)."""
    alpha, sigma = alpha_sigma(lam)
    alpha_next, sigma_next = alpha_sigma(lam_next)
    s = eta * (sigma_next / sigma) * torch.sqrt(1 - alpha**2 / alpha_next**2)
    c_z = torch.sqrt(sigma_next**2 - s**2) / sigma
    c_x = alpha_next - alpha * c_z
    return c_z, c_x, s


def dpmpp_2m_coefficients(lam: torch.Tensor, lam_next: torch.Tensor):
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2; k-diffusion's `sample_dpmpp_2m` with t = λ/2):
    h_t = (λ_{t+1} − λ_t)/2, z' = (σ'/σ)·z + α'·(1 − e^(−h))·D, D = (1 + 1/(2r))·x̂ − x̂_prev/(2r),
    r = h_{t−1}/h_t, h from each row's own (λ, λ') pair; first order (D = x̂, i.e. DDIM η = 0) on
    the first step and on the last, whose long interval would otherwise overshoot (h = ∞ after a
    first step from λ = −∞ makes the next step first order too). Returns (c_z, c_x, s, c_p)."""
    sigma = alpha_sigma(lam)[1]
    alpha_next, sigma_next = alpha_sigma(lam_next)
    h = (lam_next - lam) / 2
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
    """A sampler as the step sees it: `coefficients(λ, λ', v, η)` gives float64 columns
    (c_z, c_x, s, c_p) for each row's step from λ to λ' (finite), and `state` names the per-row
    buffers it keeps between steps."""

    name: str
    coefficients: Callable[..., tuple[torch.Tensor, ...]]
    state: tuple[str, ...] = ()


def _ancestral(lam, lam_next, v, eta):
    c_z, c_x, s = ancestral_coefficients(lam, lam_next, v)
    return c_z, c_x, s, torch.zeros_like(s)


def _ddim(lam, lam_next, v, eta):
    c_z, c_x, s = ddim_coefficients(lam, lam_next, eta)
    return c_z, c_x, s, torch.zeros_like(s)


def _dpmpp_2m(lam, lam_next, v, eta):
    return dpmpp_2m_coefficients(lam, lam_next)


SAMPLER_KINDS: dict[str, SamplerKind] = {
    "ancestral": SamplerKind("ancestral", _ancestral),
    "ddim": SamplerKind("ddim", _ddim),
    "dpmpp_2m": SamplerKind("dpmpp_2m", _dpmpp_2m, state=("x_hat",)),
}
SAMPLERS = tuple(SAMPLER_KINDS)


def prediction_alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (α, σ) that read x̂ = (z − σ·ε)/α from the net's answer at λ: alpha_sigma(λ), except
    (1, 1) at λ = −∞, where α = 0 and the net answers z − x̂ (cfgengine.model)."""
    alpha, sigma = alpha_sigma(logsnr)
    pure_noise = torch.isneginf(logsnr)
    return torch.where(pure_noise, 1.0, alpha), torch.where(pure_noise, 1.0, sigma)


def step_targets(logsnr: torch.Tensor, final_logsnr: float = math.inf,
                 targets: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [T]: the λ each row steps to — `targets` checked (each ≥ its row's λ; only the
    last may be +∞), else the next grid point and, from the last row, `final_logsnr`."""
    if targets is None:
        return torch.cat([logsnr[1:], logsnr.new_tensor([final_logsnr])])
    targets = torch.as_tensor(targets, dtype=torch.float64).reshape(-1)
    if targets.numel() != logsnr.numel():
        raise ValueError(f"targets holds {targets.numel()} values for {logsnr.numel()} steps")
    if not bool(torch.isfinite(targets[:-1]).all()) or bool(torch.isnan(targets[-1])) \
            or not bool((targets >= logsnr).all()):
        raise ValueError("each step's target λ must be finite (the last may be +inf) and not "
                         "below the λ the step starts at")
    return targets


def table_from_logsnr(logsnr: torch.Tensor, sampler: str = "ancestral", *, v: float = 0.3,
                      eta: float = 0.0, final_logsnr: float = math.inf,
                      targets: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 table [T, 6] of rows (α, σ, c_z, c_x, s, c_p) on the float64 grid `logsnr`:
    row t steps from λ_t to its target (`step_targets`); a target of +∞ makes it z' = x̂."""
    check_sampler_args(logsnr.numel(), sampler, v, eta)
    logsnr = logsnr.double()
    lam_next = step_targets(logsnr, final_logsnr, targets)
    steps = logsnr.numel() - int(bool(torch.isposinf(lam_next[-1])))  # rows with a finite target
    kind = SAMPLER_KINDS[sampler]
    columns = torch.stack(kind.coefficients(logsnr[:steps], lam_next[:steps], v, eta), dim=1)
    if steps < logsnr.numel():
        last = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)  # z' = x̂
        columns = torch.cat([columns, last], dim=0)  # (T, 4)
    alpha, sigma = prediction_alpha_sigma(logsnr)
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
    and the λ the net sees at each row (host; the state is at that λ too), the λ each row steps
    to, and per row on the host whether the net runs the
    doubled batch (2B rows: the rule guides this step) and whether the row draws no noise (s = 0);
    `state` names the per-row buffers the sampler and the rule keep. Every loop — the Sampler's,
    the CUDA graph's, the serving batch's and the bench's — runs from a StepPlan; none of them
    looks at a sampler's name or a table's width."""

    table: torch.Tensor
    logsnr: torch.Tensor
    doubled: tuple[bool, ...]
    quiet: tuple[bool, ...]
    state: tuple[str, ...]
    targets: torch.Tensor | None = None  # float64 [R]: the λ each row steps to (+∞: to x̂)
    _on: dict = field(default_factory=dict, repr=False)

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

    def unguided(self) -> "StepPlan":
        """The same plan with every row on B rows (w = 0 everywhere, or no labels)."""
        return replace(self, doubled=(False,) * self.rows, _on=self._on)


def step_plan(logsnr: torch.Tensor, sampler: str = "ancestral", *, v: float = 0.3,
              eta: float = 0.0, rule=None, final_logsnr: float = math.inf,
              targets: torch.Tensor | None = None) -> StepPlan:
    """The StepPlan of `sampler` on the float64 grid `logsnr` under guidance `rule` (a CFG,
    ZeroStar or APG config; None = CFG()): the rule's interval decides which rows are doubled, its
    per-row state (APG's momentum) joins the sampler's. Each row steps to the next grid point and
    the last to `final_logsnr`, unless `targets` gives each row's own (a pipeline-exact
    schedule, ModelInfo.steps_to)."""
    lam = logsnr.double()
    targets = step_targets(lam, final_logsnr, targets)
    table = table_from_logsnr(lam, sampler, v=v, eta=eta, targets=targets)
    rule = CFG() if rule is None else rule
    interval = rule.interval
    doubled = tuple(interval is None or interval[0] <= x <= interval[1] for x in lam.tolist())
    quiet = tuple(s == 0 for s in table[:, NOISE].tolist())
    state = SAMPLER_KINDS[sampler].state + rule.row_state
    return StepPlan(table, lam, doubled, quiet, state, targets)


def check_sampler_args(steps: int, sampler: str, v: float, eta: float) -> None:
    """Raise ValueError naming the first bad sampler setting."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer ≥ 2, got {steps!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    for name, value in (("v", v), ("eta", eta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
