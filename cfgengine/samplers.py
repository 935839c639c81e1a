"""The samplers people pick, each as rows of the engine's one fused step (docs/samplers.md).

A row is one network evaluation: x̂ = rule(z, ε) at the row's λ, then

    z' = c_z·z + c_x·x̂ + c_p·x̂₁ + c_p2·x̂₂ + c_p3·x̂₃ + s·n

where x̂_k is the x̂ of the row k rows back and n the counter noise at the row's key. A sampler is
registered once (name → row builder, options and their defaults, NFE per step); nothing else
branches on its name. Builders write each update the way k-diffusion and diffusers do, in
σ-space (x = z/α, σ = e^(−λ/2), D = x̂), as a `Combo` of this row's state and earlier rows' x̂;
`compile_rows` turns the combos into the float64 VP table. An update that needs an earlier state
(Heun's x, DPM++ 2S's x, UniPC's corrected x) expresses it through the current state by
inverting the row that produced it (`state_before`), so the table never looks back at a z.

Noise: row r draws at key r + 1 — the step's existing key, with the step being the table row, so
the kernel and every loop draw it unchanged and a sample depends only on (seed, sample id). With
one row per grid step that is key t + 1 for step t (DDIM η = 1 and Euler ancestral then add the
same noise); the two-row samplers draw only on a step's second row, 2t + 1, at key 2t + 2. No
sampler draws twice in a row, so no other keys are in use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from cfgengine.schedule import alpha_sigma, prediction_alpha_sigma

ALPHA, SIGMA, C_Z, C_X, NOISE, C_P, C_P2, C_P3 = range(8)
COLUMNS = 8  # (α, σ, c_z, c_x, s, c_p, c_p2, c_p3)
MAX_HISTORY = 3  # x̂ of up to three earlier rows (UniPC order 3)


class Combo(dict):
    """A linear combination {term: coefficient}; terms are ("x", row) — that row's σ-space
    state — and ("D", row) — that row's x̂."""

    def __add__(self, other: "Combo") -> "Combo":
        out = Combo(self)
        for term, coef in other.items():
            out[term] = out.get(term, 0.0) + coef
        return out

    def __sub__(self, other: "Combo") -> "Combo":
        return self + other * -1.0

    def __mul__(self, scale: float) -> "Combo":
        return Combo({term: coef * scale for term, coef in self.items()})

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> "Combo":
        return self * (1.0 / scale)


def X(row: int) -> Combo:
    """The σ-space state x = z/α that row `row` evaluates the network on."""
    return Combo({("x", row): 1.0})


def D(row: int) -> Combo:
    """Row `row`'s x̂ (k-diffusion's `denoised`, diffusers' x0 prediction)."""
    return Combo({("D", row): 1.0})


@dataclass(frozen=True)
class Update:
    """One row in σ-space, belonging to grid step `step`: the net sees `logsnr`; the next state
    is `combo` + `noise`·n, n the row's counter noise."""

    step: int
    logsnr: float
    combo: Combo
    noise: float = 0.0


def state_before(update: Update, row: int) -> Combo:
    """The state x_row of `update` (row `row`, combo a·x_row + rest, noiseless) in terms of the
    next row's state: (x_{row+1} − rest)/a."""
    if update.noise:
        raise ValueError("a noisy row's state cannot be recovered from the next")
    a = update.combo[("x", row)]
    rest = Combo({t: c for t, c in update.combo.items() if t != ("x", row)})
    return (X(row + 1) - rest) / a


def sigma_k(logsnr: float) -> float:
    """k-diffusion's σ = σ_VP/α_VP = e^(−λ/2)."""
    return math.exp(-logsnr / 2)


def logsnr_of(sigma: float) -> float:
    """λ = −2·ln σ of a k-diffusion σ."""
    return -2.0 * math.log(sigma)


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) of an ancestral step (k-diffusion's `get_ancestral_step`): σ_up² is
    η²·σ'²·(σ² − σ'²)/σ², at most σ'², and σ_down² = σ'² − σ_up²."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def toward(x: Combo, d: Combo, ratio: float) -> Combo:
    """An Euler (DDIM η = 0) step in σ-space: x + (σ_next − σ)·(x − D)/σ with ratio = σ_next/σ;
    ratio 0 (σ_next = 0) gives D."""
    return x * ratio + d * (1.0 - ratio)


# ---------------------------------------------------------------------------------------------
# Builders: the extended grid λ_0 < … < λ_{T−1} < λ_T (λ_T = +∞: σ = 0, the usual end) → one
# Update per network evaluation. Each follows the named k-diffusion / diffusers sampler line by
# line, including its special step into σ = 0; tests/samplers runs those against them.
# ---------------------------------------------------------------------------------------------


def euler_ancestral(lam: list[float], *, eta: float = 1.0, s_noise: float = 1.0) -> list[Update]:
    """k-diffusion `sample_euler_ancestral`: an Euler step to σ_down, then s_noise·σ_up·n.
    With s_noise = 1 and η ≤ 1 these are DDIM's rows at the same η (`ddim_coefficients`)."""
    rows = []
    for t in range(len(lam) - 1):
        sigma = sigma_k(lam[t])
        down, up = ancestral_step(sigma, sigma_k(lam[t + 1]), eta)
        rows.append(Update(t, lam[t], toward(X(t), D(t), down / sigma), s_noise * up))
    return rows


def heun(lam: list[float]) -> list[Update]:
    """k-diffusion `sample_heun` (s_churn = 0): per step an Euler row to x₂ at σ', then a row at
    x₂ with x' = x + (σ' − σ)·(d + d₂)/2; d = (x − D_A)/σ = (x₂ − x)/(σ' − σ) and
    d₂ = (x₂ − D_B)/σ'. The step into σ = 0 is one Euler row (x' = D)."""
    rows = []
    for t in range(len(lam) - 1):
        first, second = len(rows), len(rows) + 1
        sigma, sigma_next = sigma_k(lam[t]), sigma_k(lam[t + 1])
        predict = Update(t, lam[t], toward(X(first), D(first), sigma_next / sigma))
        if sigma_next == 0.0:
            rows.append(predict)
            continue
        x, x2 = state_before(predict, first), X(second)
        dt = sigma_next - sigma
        correct = (x + x2) * 0.5 + (x2 - D(second)) * (dt / (2 * sigma_next))
        rows += [predict, Update(t, lam[t + 1], correct)]
    return rows


def dpmpp_2s_ancestral(lam: list[float], *, eta: float = 1.0,
                       s_noise: float = 1.0) -> list[Update]:
    """k-diffusion `sample_dpmpp_2s_ancestral`: per step a row at σ that moves to the midpoint
    σ_s = √(σ·σ_down) (in log σ), a row there whose x̂ takes x to σ_down, then s_noise·σ_up·n
    on that second row."""
    rows = []
    for t in range(len(lam) - 1):
        first, second = len(rows), len(rows) + 1
        sigma = sigma_k(lam[t])
        down, up = ancestral_step(sigma, sigma_k(lam[t + 1]), eta)
        if down == 0.0:  # the step into σ = 0 (or η large enough): Euler, x' = D
            rows.append(Update(t, lam[t], D(first), s_noise * up))
            continue
        h = math.log(sigma / down)
        mid = sigma * math.exp(-h / 2)
        predict = Update(t, lam[t], toward(X(first), D(first), mid / sigma))
        x = state_before(predict, first)
        rows += [predict, Update(t, logsnr_of(mid), toward(x, D(second), down / sigma),
                                 s_noise * up)]
    return rows


def sde_rows(lam: list[float], eta: float, s_noise: float, correction) -> list[Update]:
    """DPM-Solver++ SDE steps (k-diffusion's 2M/3M SDE): with h = t' − t (t = λ/2) and
    h_η = (1 + η)·h, x' = e^(−h_η)·x + (1 − e^(−h_η))·D + correction(t, h, h_η), then
    σ'·√(1 − e^(−2ηh))·s_noise·n; x' = D into σ = 0."""
    rows = []
    for t in range(len(lam) - 1):
        if math.isinf(lam[t + 1]):
            rows.append(Update(t, lam[t], D(t)))
            continue
        h = (lam[t + 1] - lam[t]) / 2
        h_eta = h * (eta + 1)
        combo = X(t) * math.exp(-h_eta) + D(t) * -math.expm1(-h_eta) + correction(t, h, h_eta)
        noise = sigma_k(lam[t + 1]) * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
        rows.append(Update(t, lam[t], combo, noise))
    return rows


def dpmpp_2m_sde(lam: list[float], *, eta: float = 1.0, s_noise: float = 1.0,
                 solver: str = "midpoint") -> list[Update]:
    """k-diffusion `sample_dpmpp_2m_sde` (`solver_type` midpoint or heun): `sde_rows` plus
    c·(D − D₁)/r, r = h₁/h, c = (1 − e^(−h_η))/2 (midpoint) or (1 − e^(−h_η))/(−h_η) + 1
    (heun); first order on the first step."""
    def correction(t: int, h: float, h_eta: float) -> Combo:
        if t == 0:
            return Combo()
        r = (lam[t] - lam[t - 1]) / 2 / h
        gain = -math.expm1(-h_eta)
        c = gain / -h_eta + 1.0 if solver == "heun" else 0.5 * gain
        return (D(t) - D(t - 1)) * (c / r)
    return sde_rows(lam, eta, s_noise, correction)


def dpmpp_3m_sde(lam: list[float], *, eta: float = 1.0, s_noise: float = 1.0) -> list[Update]:
    """k-diffusion `sample_dpmpp_3m_sde`: `sde_rows` plus φ₂·d₁ − φ₃·d₂, d₁ and d₂ the divided
    differences of D, D₁, D₂ over the last steps' h (first order on step 0, second on step 1)."""
    def correction(t: int, h: float, h_eta: float) -> Combo:
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if t == 0:
            return Combo()
        r0 = (lam[t] - lam[t - 1]) / 2 / h
        d1_0 = (D(t) - D(t - 1)) / r0
        if t == 1:
            return d1_0 * phi_2
        r1 = (lam[t - 1] - lam[t - 2]) / 2 / h
        d1_1 = (D(t - 1) - D(t - 2)) / r1
        d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return d1 * phi_2 - d2 * (phi_2 / h_eta - 0.5)
    return sde_rows(lam, eta, s_noise, correction)


def unipc_rhos(h: float, ratios: list[float], order: int, corrector: bool) -> list[float]:
    """UniPC's B(h) = e^(−h) − 1 ("bh2") weights (Zhao et al. 2023, alg. 1–2, data prediction)
    as diffusers computes them: R[k][j] = r_j^k, b_k = h·φ_{k+1}(h)·(k+1)!/B(h); the predictor
    solves the leading (order−1)² block (0.5 at order 2), the corrector all of it (0.5 at
    order 1). `ratios` = r_1 … r_{order−1}, 1."""
    hh = -h
    phi, factorial, b = math.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(phi * factorial / math.expm1(hh))
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    size = order if corrector else order - 1
    if size <= 1:  # UniP-2 and UniC-1 use 0.5, not the solve
        return [0.5] * size
    R = torch.tensor([[r**k for r in ratios[:size]] for k in range(size)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b[:size], dtype=torch.float64)).tolist()


def unipc_step(lam: list[float], s0: int, target: int, order: int, corrector: bool):
    """One UniP (or UniC) update from grid point s0 to `target`: (e^(−h), D-part) where the new
    state is e^(−h)·x + D-part, and the corrector's weight on (D_target − D_s0) (0 for UniP)."""
    h = (lam[target] - lam[s0]) / 2
    ratios = [(lam[s0 - k] - lam[s0]) / (2 * h) for k in range(1, order)] + [1.0]
    rhos = unipc_rhos(h, ratios, order, corrector)
    b_h = math.expm1(-h)
    part = D(s0) * -b_h  # −h·φ₁(h)·m₀, h·φ₁ = e^(−h) − 1 = B(h) for bh2
    for k, ratio in enumerate(ratios[:-1], 1):
        part = part - (D(s0 - k) - D(s0)) * (b_h * rhos[k - 1] / ratio)
    last = -b_h * rhos[-1] if corrector else 0.0
    return math.exp(-h), part, last


def unipc(lam: list[float], *, order: int = 2) -> list[Update]:
    """diffusers `UniPCMultistepScheduler` (bh2, x0 prediction, lower_order_final): at grid
    point i the net sees the predicted x_i; the corrector (UniC, order of the previous
    predictor) forms x_i^c from x_{i−1}^c, the x̂ history and x̂_i; the predictor (UniP, order
    min(order, i + 1, T − i)) moves x_i^c to x_{i+1}. x_{i−1}^c enters as
    (x_i − D-part)/e^(−h), the previous predictor inverted, so no z history is kept."""
    rows, corrected, last_order, steps = [], X(0), 0, len(lam) - 1
    for i in range(steps):
        if i > 0:
            decay, part, weight = unipc_step(lam, i - 1, i, last_order, corrector=True)
            corrected = corrected * decay + part + (D(i) - D(i - 1)) * weight
        last_order = min(order, i + 1, steps - i)
        decay, part, _ = unipc_step(lam, i, i + 1, last_order, corrector=False)
        rows.append(Update(i, lam[i], corrected * decay + part))
        if i + 1 < steps:
            corrected = (X(i + 1) - part) / decay
    return rows


# ---------------------------------------------------------------------------------------------
# Rows: the float64 table and the per-row host facts the loop needs.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """A sampler on a grid: R network evaluations. `table` float64 [R, 5 + max(1, history)]
    holds (α, σ, c_z, c_x, s, c_p[, c_p2[, c_p3]]) — c_pk weighs the x̂ of the row k back;
    `logsnr` the λ the net sees; `steps` each row's grid step; `history` how many earlier rows'
    x̂ the rows read (0–3)."""

    table: torch.Tensor
    logsnr: torch.Tensor
    steps: tuple[int, ...]
    history: int

    @property
    def noise_keys(self) -> tuple[int, ...]:
        """The counter-noise key of each row: r + 1 (the key the step draws at for table row r)."""
        return tuple(range(1, len(self.steps) + 1))

    @property
    def quiet(self) -> tuple[bool, ...]:
        """Rows that draw no noise (s = 0)."""
        return tuple(s == 0.0 for s in self.table[:, NOISE].tolist())

    @property
    def state(self) -> tuple[str, ...]:
        """The step's RowState fields holding that history (x̂ of 1, 2, 3 rows back)."""
        return HISTORY_STATE[: self.history]


LAG_COLUMNS = (C_X, C_P, C_P2, C_P3)  # x̂ of this row, 1, 2 and 3 rows back
HISTORY_STATE = ("x_hat", "x_hat_2", "x_hat_3")  # RowState's x̂ of 1, 2, 3 rows back


def compile_rows(updates: list[Update], final_logsnr: float = math.inf) -> Rows:
    """The VP table of σ-space updates: with z = α·x, x' = a·x + Σ b_k·D_{r−k} + d·n becomes
    c_z = a·α'/α, c_x|c_pk = b_k·α', s = d·α' (α' the next row's α; after the last row the α
    of `final_logsnr`, 1 at +∞)."""
    lam = torch.tensor([u.logsnr for u in updates], dtype=torch.float64)
    alpha, sigma = alpha_sigma(lam)
    alpha_next = torch.cat([alpha[1:], alpha_sigma(lam.new_tensor([final_logsnr]))[0]])
    table = torch.zeros(len(updates), COLUMNS, dtype=torch.float64)
    table[:, ALPHA], table[:, SIGMA] = alpha, sigma
    history = 0
    for r, update in enumerate(updates):
        for (kind, row), coef in update.combo.items():
            lag = r - row
            if (kind == "x" and lag != 0) or not 0 <= lag <= MAX_HISTORY:
                raise ValueError(f"row {r} reads {kind}[{row}]: outside the step's state")
            table[r, C_Z if kind == "x" else LAG_COLUMNS[lag]] += coef
            history = max(history, lag if coef else 0)
        table[r, NOISE] = update.noise
    table[:, C_Z] /= alpha
    table[:, C_Z:] *= alpha_next[:, None]
    return Rows(table[:, : C_P + max(1, history)], lam, tuple(u.step for u in updates), history)


# The paper's ancestral sampler, DDIM and DPM-Solver++(2M): VP coefficients on the grid.


def ancestral_coefficients(lam: torch.Tensor, lam_next: torch.Tensor, v: float = 0.3):
    """Algorithm 2 from each λ to its λ': μ = r·(α'/α)·z + (1 − r)·α'·x̂,
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
    """DDIM from each λ to its λ': s = η·(σ'/σ)·√(1 − α²/α'²), c_z = √(σ'² − s²)/σ,
    c_x = α' − α·c_z (ε re-derived from the clipped x̂). Returns (c_z, c_x, s). η = 1 is
    k-diffusion's `sample_euler_ancestral` with eta = 1 on the same noise
    (tests/samplers/test_kdiffusion.py)."""
    alpha, sigma = alpha_sigma(lam)
    alpha_next, sigma_next = alpha_sigma(lam_next)
    s = eta * (sigma_next / sigma) * torch.sqrt(1 - alpha**2 / alpha_next**2)
    c_z = torch.sqrt(sigma_next**2 - s**2) / sigma
    c_x = alpha_next - alpha * c_z
    return c_z, c_x, s


def dpmpp_2m_coefficients(lam: torch.Tensor, lam_next: torch.Tensor):
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2; k-diffusion's `sample_dpmpp_2m` with t = λ/2):
    h_t = (λ_{t+1} − λ_t)/2, z' = (σ'/σ)·z + α'·(1 − e^(−h))·D, D = (1 + 1/(2r))·x̂ − x̂_prev/(2r),
    r = h_{t−1}/h_t with h of each row's own (λ, λ') pair; first order (D = x̂, i.e. DDIM η = 0)
    on the first step and on the last, whose long interval would otherwise overshoot (a first step
    from λ = −∞ has h = ∞, so the next is first order too). Returns (c_z, c_x, s, c_p)."""
    sigma = alpha_sigma(lam)[1]
    alpha_next, sigma_next = alpha_sigma(lam_next)
    h = (lam_next - lam) / 2
    gain = alpha_next * -torch.expm1(-h)  # α'·(1 − e^(−h))
    half_inv_r = torch.zeros_like(h)  # 1/(2r); 0 keeps the first-order steps
    half_inv_r[1:-1] = h[1:-1] / (2 * h[:-2])
    c_p = 0.0 - gain * half_inv_r  # 0.0 − …: +0, not −0, on first-order steps
    return sigma_next / sigma, gain * (1 + half_inv_r), torch.zeros_like(h), c_p


def grid_rows(coefficients) -> Callable[..., Rows]:
    """Rows of a sampler given by VP coefficients on the grid (the paper's ancestral sampler,
    DDIM, DPM-Solver++(2M): cfgengine.tables): `coefficients(λ, λ', **options)` gives
    (c_z, c_x, s[, c_p]) for each row's step from λ to λ' — the next grid point, from the last
    row the final λ, or each row's own `targets` (a pipeline's exact pairs); a last target of +∞
    makes the last row z' = x̂."""
    def rows(logsnr: torch.Tensor, final_logsnr: float, targets: torch.Tensor | None = None,
             **options) -> Rows:
        if targets is None:
            targets = torch.cat([logsnr[1:], logsnr.new_tensor([final_logsnr])])
        finite = logsnr.numel() - int(bool(torch.isposinf(targets[-1])))
        columns = coefficients(logsnr[:finite], targets[:finite], **options)
        table = torch.zeros(logsnr.numel(), C_P + 1, dtype=torch.float64)
        table[:, ALPHA], table[:, SIGMA] = prediction_alpha_sigma(logsnr)  # (1, 1) at λ = −∞
        table[-1, C_X] = 1.0  # z' = x̂, unless a finite final λ's step overwrites it
        for column, values in zip((C_Z, C_X, NOISE, C_P), columns):
            table[: values.numel(), column] = values
        history = int(bool((table[:, C_P] != 0).any()))
        return Rows(table, logsnr, tuple(range(logsnr.numel())), history)
    return rows


# ---------------------------------------------------------------------------------------------
# The registry: name → rows builder, its options (default, check), network evaluations per step.
# ---------------------------------------------------------------------------------------------


def _number_at_least_0(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= 0


def _number_in_0_1(value) -> bool:
    return _number_at_least_0(value) and value <= 1


def _one_of(*choices) -> Callable[[object], bool]:
    return lambda value: not isinstance(value, bool) and value in choices


CHECK_TEXT = {_number_at_least_0: "a number ≥ 0", _number_in_0_1: "a number in [0, 1]"}


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: `rows(logsnr, **options)` builds its Rows; `options` maps each
    option to (default, check); `nfe` is network evaluations per step (the last step: 1)."""

    rows: Callable[..., Rows]
    options: dict[str, tuple[object, Callable[[object], bool]]]
    nfe: int


def _sigma_space(builder) -> Callable[..., Rows]:
    """A builder's Rows on the grid extended by its final λ."""
    def rows(logsnr: torch.Tensor, final_logsnr: float, targets: torch.Tensor | None = None,
             **options) -> Rows:
        if targets is not None:
            raise ValueError("a pipeline's own step pairs run with the ancestral, ddim or "
                             "dpmpp_2m samplers only")
        return compile_rows(builder(logsnr.tolist() + [final_logsnr], **options), final_logsnr)
    return rows


NOISE_OPTIONS = {"eta": (1.0, _number_at_least_0), "s_noise": (1.0, _number_at_least_0)}
SAMPLERS: dict[str, SamplerSpec] = {
    "ancestral": SamplerSpec(grid_rows(ancestral_coefficients), {"v": (0.3, _number_in_0_1)}, 1),
    "ddim": SamplerSpec(grid_rows(ddim_coefficients), {"eta": (0.0, _number_in_0_1)}, 1),
    "dpmpp_2m": SamplerSpec(grid_rows(dpmpp_2m_coefficients), {}, 1),
    "euler_ancestral": SamplerSpec(_sigma_space(euler_ancestral), NOISE_OPTIONS, 1),
    "heun": SamplerSpec(_sigma_space(heun), {}, 2),
    "dpmpp_2s_ancestral": SamplerSpec(_sigma_space(dpmpp_2s_ancestral), NOISE_OPTIONS, 2),
    "dpmpp_2m_sde": SamplerSpec(_sigma_space(dpmpp_2m_sde), {
        **NOISE_OPTIONS, "solver": ("midpoint", _one_of("midpoint", "heun"))}, 1),
    "dpmpp_3m_sde": SamplerSpec(_sigma_space(dpmpp_3m_sde), NOISE_OPTIONS, 1),
    "unipc": SamplerSpec(_sigma_space(unipc), {"order": (2, _one_of(1, 2, 3))}, 1),
}


def sampler_options(name: str, **options) -> dict[str, object]:
    """The sampler's options with defaults filled in (an option given as None takes its
    default); ValueError naming the first unknown sampler, option or bad value."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    known = SAMPLERS[name].options
    settings = {key: default for key, (default, _) in known.items()}
    for key, value in options.items():
        if key not in known:
            allowed = ", ".join(known) or "none"
            raise ValueError(f"sampler {name!r} takes no option {key!r} (its options: {allowed})")
        if value is None:
            continue
        check = known[key][1]
        if not check(value):
            want = CHECK_TEXT.get(check, "one of the listed values")
            raise ValueError(f"{name} option {key} must be {want}, got {value!r}")
        settings[key] = value
    return settings


def sampler_rows(name: str, logsnr: torch.Tensor, *, final_logsnr: float = math.inf,
                 targets: torch.Tensor | None = None, **options) -> Rows:
    """The Rows of sampler `name` on the increasing float64 grid `logsnr` (≥ 2 points), its last
    row stepping to `final_logsnr` (+∞: σ = 0, z' = x̂), or each row to its own `targets`."""
    settings = sampler_options(name, **options)
    return SAMPLERS[name].rows(logsnr.to(torch.float64), final_logsnr, targets, **settings)
