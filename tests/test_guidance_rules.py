"""The guidance rules (CFG with rescale, CFG-Zero*, APG) and thresholds (a number, DynamicThreshold)
of the step's torch reference, against float64 math written here from docs/design.md ("Guidance
rules", "DPM-Solver++(2M)") and against diffusers' own functions on random tensors.

Table rows are built here from the formulas too (a DDIM row and a DPM-Solver++(2M) row with
c_p ≠ 0), so these tests depend on neither cfgengine.tables nor cfgengine.schedule.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfgengine import APG, CFG, DynamicThreshold, ZeroStar
from cfgengine.kernels import CounterNoise, RowState, guided_step
from cfgengine.kernels.reference import dynamic_threshold_scale, guided_step_reference

SHAPES = [(3, 5, 7), (13,)]  # odd sizes; a flat toy sample
W = torch.tensor([0.0, 0.3, 1.0, 4.0, 2.5])  # per-sample, with a w = 0 row
B = W.numel()
TOL = 1e-5  # fp32 step against float64 math (sums over ≤ 105 elements)


# --- float64 math, from the design text ----------------------------------------------------------

def alpha_sigma(logsnr: float) -> tuple[float, float]:
    """α² = sigmoid(λ), σ² = sigmoid(−λ)."""
    return math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr)))


def ddim_row(lam: float, lam_next: float, eta: float) -> list[float]:
    """(α, σ, c_z, c_x, s, c_p) of DDIM η: s = η·(σ'/σ)·√(1 − α²/α'²), c_z = √(σ'² − s²)/σ,
    c_x = α' − α·c_z, c_p = 0."""
    (a, s_), (a2, s2) = alpha_sigma(lam), alpha_sigma(lam_next)
    noise = eta * (s2 / s_) * math.sqrt(1 - a**2 / a2**2)
    c_z = math.sqrt(s2**2 - noise**2) / s_
    return [a, s_, c_z, a2 - a * c_z, noise, 0.0]


def dpmpp_row(lam_prev: float, lam: float, lam_next: float) -> list[float]:
    """A second-order DPM-Solver++(2M) row: h = (λ' − λ)/2, r = h_prev/h, c_z = σ'/σ,
    c_x = α'(1 − e^(−h))(1 + 1/(2r)), c_p = −α'(1 − e^(−h))/(2r), s = 0."""
    (a, s_), (a2, s2) = alpha_sigma(lam), alpha_sigma(lam_next)
    h, h_prev = (lam_next - lam) / 2, (lam - lam_prev) / 2
    r = h_prev / h
    first = a2 * (1 - math.exp(-h))
    return [a, s_, s2 / s_, first * (1 + 1 / (2 * r)), 0.0, -first / (2 * r)]


ROWS = {"ddim": ddim_row(-1.0, 0.5, eta=0.5), "dpmpp_2m": dpmpp_row(-2.5, -1.0, 0.5)}


def f64_rule(eps_c, eps_u, z, w, alpha, sigma, rule, m):
    """x̂ of one sample (flat float64 vectors) before thresholding, and APG's new momentum."""
    if isinstance(rule, APG):
        d_c, d_u = (z - sigma * eps_c) / alpha, (z - sigma * eps_u) / alpha
        m = (d_c - d_u) + rule.momentum * m
        delta = m
        if rule.norm_threshold > 0:
            delta = delta * min(1.0, rule.norm_threshold / delta.norm().item())
        parallel = (delta @ d_c) / (d_c @ d_c) * d_c
        return d_c + w * ((delta - parallel) + rule.eta * parallel), m
    if isinstance(rule, ZeroStar):
        scale = (eps_c @ eps_u) / (eps_u @ eps_u + 1e-8)
        eps = scale * eps_u + (1 + w) * (eps_c - scale * eps_u)
    else:
        eps = (1 + w) * eps_c - w * eps_u
        if rule.rescale > 0:
            phi = rule.rescale
            eps = phi * eps * eps_c.std() / eps.std() + (1 - phi) * eps  # unbiased std
    return (z - sigma * eps) / alpha, m


def f64_threshold(x_hat, clip):
    if clip is None:
        return x_hat
    if isinstance(clip, DynamicThreshold):
        s = float(np.quantile(x_hat.abs().numpy(), clip.p))  # numpy's default: linear
        s = min(max(s, 1.0), clip.max_value)
        return x_hat.clamp(-s, s) / s
    return x_hat.clamp(-clip, clip)


def f64_step(eps2, z, w, row, rule, state, x_prev, clip, noise):
    """(z', x̂, m) in float64, sample by sample: z' = c_z·z + c_x·x̂ + c_p·x̂_prev + s·n."""
    alpha, sigma, c_z, c_x, s, c_p = row
    z_next, x_hats, states = [], [], []
    for i in range(z.shape[0]):
        flat = lambda t: t[i].double().flatten()
        m = flat(state) if state is not None else torch.zeros_like(flat(z))
        x_hat, m = f64_rule(flat(eps2[:B]), flat(eps2[B:]), flat(z), float(w[i]), alpha, sigma,
                            rule, m)
        x_hat = f64_threshold(x_hat, clip)
        z_next.append(c_z * flat(z) + c_x * x_hat + c_p * flat(x_prev) + s * flat(noise))
        x_hats.append(x_hat)
        states.append(m)
    return tuple(torch.stack(v).reshape(z.shape) for v in (z_next, x_hats, states))


# --- helpers -------------------------------------------------------------------------------------

def inputs(seed: int, shape, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda rows: torch.randn((rows, *shape), generator=gen)
    return dict(eps2=draw(2 * B), z=scale * draw(B), x_prev=draw(B), noise=draw(B), state=draw(B))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def step(t, row, rule, clip=None, state=None, w=W, **kwargs):
    """The torch reference on table [[row]] at step 0, into NaN-poisoned z' and x̂ buffers (x̂
    holds x̂_prev when c_p ≠ 0: read, then overwritten); `state` is APG's momentum."""
    table = torch.tensor([row], dtype=torch.float32)
    out = torch.full_like(t["z"], math.nan)
    x_hat = t["x_prev"].clone() if row[-1] != 0 else torch.full_like(t["z"], math.nan)
    guided_step(t["eps2"], t["z"], w, table, 0, rule=rule, clip=clip,
                state=RowState(momentum=state, x_hat=x_hat), noise=t["noise"], out=out,
                impl="torch", **kwargs)
    assert not out.isnan().any() and not x_hat.isnan().any()
    return out, x_hat


RULES = {
    "cfg": CFG(),
    "cfg-rescale": CFG(rescale=0.7),
    "zero-star": ZeroStar(),
    "apg": APG(eta=0.3, momentum=-0.5, norm_threshold=3.0),
    "apg-plain": APG(),
}
CLIPS = {"none": None, "static": 1.0, "dynamic": DynamicThreshold(p=0.9, max_value=1.6)}


# --- the rules against float64 -------------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rule_step_matches_float64_design_math(rule, clip, row, shape):
    t = inputs(seed=1, shape=shape, scale=1.5)  # |x̂| past 1 on some elements: thresholds act
    rule, clip = RULES[rule], CLIPS[clip]
    state = t["state"].clone()
    got_z, got_x = step(t, ROWS[row], rule, clip, state=state)
    want_z, want_x, want_m = f64_step(t["eps2"], t["z"], W, ROWS[row], rule, t["state"],
                                      t["x_prev"], clip, t["noise"])
    assert rel_err(got_z, want_z) <= TOL and rel_err(got_x, want_x) <= TOL
    if isinstance(rule, APG):
        assert rel_err(state, want_m) <= TOL


def test_apg_momentum_over_several_steps_matches_float64():
    rule, row = APG(eta=0.5, momentum=-0.75, norm_threshold=2.0), ROWS["ddim"]
    state, state64 = torch.zeros(B, 3, 5, 7), torch.zeros(B, 3, 5, 7, dtype=torch.float64)
    for seed in range(3):
        t = inputs(seed=10 + seed, shape=(3, 5, 7))
        got_z, _ = step(t, row, rule, state=state)
        want_z, _, state64 = f64_step(t["eps2"], t["z"], W, row, rule, state64, t["x_prev"], None,
                                      t["noise"])
        assert rel_err(got_z, want_z) <= TOL and rel_err(state, state64) <= TOL


@pytest.mark.parametrize("rule", RULES)
def test_w_zero_gives_exactly_the_conditional_prediction(rule):
    t = inputs(seed=2, shape=(3, 5, 7))
    w = torch.zeros(B)
    row = ROWS["dpmpp_2m"]
    got = step(t, row, RULES[rule], state=t["state"].clone(), w=w)
    plain = step(dict(t, eps2=t["eps2"][:B]), row, CFG(), w=w)  # B rows: ε̃ = ε_c
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    alpha, sigma = row[:2]
    d_c = (t["z"] - torch.tensor(sigma) * t["eps2"][:B]) / torch.tensor(alpha)
    assert torch.equal(got[1], d_c)


@pytest.mark.parametrize("rule", RULES)
def test_b_row_eps_is_unguided_and_leaves_the_state(rule):
    t = inputs(seed=3, shape=(13,))
    state = t["state"].clone()
    got = step(dict(t, eps2=t["eps2"][:B]), ROWS["ddim"], RULES[rule], state=state)
    want = step(dict(t, eps2=t["eps2"][:B]), ROWS["ddim"], CFG())
    assert torch.equal(got[0], want[0]) and torch.equal(state, t["state"])


@pytest.mark.parametrize("rule", ["cfg-rescale", "zero-star", "apg"])
def test_a_row_never_depends_on_the_other_rows(rule):
    t = inputs(seed=4, shape=(3, 5, 7))
    other = inputs(seed=5, shape=(3, 5, 7))
    mixed = {k: v.clone() for k, v in t.items()}
    for k in mixed:  # rows 1.. of every operand replaced; row 0 kept
        rows = slice(1, None)
        if k == "eps2":
            mixed[k][1:B], mixed[k][B + 1:] = other[k][1:B], other[k][B + 1:]
        else:
            mixed[k][rows] = other[k][rows]
    state_a, state_b = t["state"].clone(), mixed["state"].clone()
    a = step(t, ROWS["ddim"], RULES[rule], DynamicThreshold(0.8, 2.0), state=state_a)
    b = step(mixed, ROWS["ddim"], RULES[rule], DynamicThreshold(0.8, 2.0), state=state_b)
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(state_a[0], state_b[0])


def test_c_p_reads_x_hat_prev_only_where_it_is_not_zero():
    t = inputs(seed=6, shape=(13,))
    table = torch.tensor([ROWS["ddim"], ROWS["dpmpp_2m"]], dtype=torch.float32)
    steps = torch.tensor([0, 1, 0, 1, 1])
    x_prev = t["x_prev"].clone()
    x_prev[steps == 0] = math.nan  # never read on c_p = 0 rows
    got = guided_step(t["eps2"], t["z"], W, table, steps, state=RowState(x_hat=x_prev),
                      noise=t["noise"], impl="torch")
    assert not got.isnan().any()
    missing = guided_step(t["eps2"], t["z"], W, table, steps, noise=t["noise"], impl="torch")
    assert missing[steps == 1].isnan().all() and not missing[steps == 0].isnan().any()


def test_kept_x_hat_is_read_before_it_is_overwritten():
    t = inputs(seed=7, shape=(3, 5, 7))
    table = torch.tensor([ROWS["dpmpp_2m"]], dtype=torch.float32)
    separate, separate_x = guided_step_reference(t["eps2"], t["z"], W, table, 0,
                                                 state=RowState(x_hat=t["x_prev"]),
                                                 noise=CounterNoise())
    buffer = t["x_prev"].clone()
    aliased = guided_step(t["eps2"], t["z"], W, table, 0, state=RowState(x_hat=buffer),
                          impl="torch")
    assert torch.equal(aliased, separate) and torch.equal(buffer, separate_x)


# --- against diffusers ---------------------------------------------------------------------------

def identity_row() -> list[float]:
    """α = σ = 1, z' = x̂: with z = 0 the step returns −ε̃ (or APG's x̂ with D = −ε)."""
    return [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def eps_of(eps2, w, rule):
    """ε̃ of the reference step for `rule`, read off z' = x̂ = −ε̃ at z = 0."""
    t = dict(eps2=eps2, z=torch.zeros_like(eps2[:B]), x_prev=torch.zeros_like(eps2[:B]),
             noise=torch.zeros_like(eps2[:B]))
    return -step(t, identity_row(), rule, w=w)[0]


@pytest.mark.parametrize("rescale", [0.0, 0.5, 1.0])
def test_rescale_equals_diffusers_rescale_noise_cfg(rescale):
    guider_utils = pytest.importorskip("diffusers.guiders.guider_utils")
    eps2 = inputs(seed=8, shape=(4, 9, 11))["eps2"]
    w = 2.0
    eps_c, eps_u = eps2[:B], eps2[B:]
    noise_cfg = eps_u + (1 + w) * (eps_c - eps_u)  # guidance_scale = 1 + w
    want = guider_utils.rescale_noise_cfg(noise_cfg, eps_c, guidance_rescale=rescale)
    assert rel_err(eps_of(eps2, w, CFG(rescale=rescale)), want) <= TOL


def test_zero_star_equals_diffusers_cfg_zero_star_scale():
    zero_star = pytest.importorskip("diffusers.guiders.classifier_free_zero_star_guidance")
    eps2 = inputs(seed=9, shape=(4, 9, 11))["eps2"]
    eps2[B:] = 0.6 * eps2[:B] + 0.8 * eps2[B:]  # correlated, as real ε_c, ε_u are
    w = 3.0
    eps_c, eps_u = eps2[:B], eps2[B:]
    scale = zero_star.cfg_zero_star_scale(eps_c.flatten(1), eps_u.flatten(1)).reshape(B, 1, 1, 1)
    want = scale * eps_u + (1 + w) * (eps_c - scale * eps_u)
    assert rel_err(eps_of(eps2, w, ZeroStar()), want) <= TOL


@pytest.mark.parametrize("eta, momentum, norm", [(0.0, 0.0, 0.0), (1.0, -0.5, 0.0),
                                                 (0.3, -0.75, 4.0), (0.5, 0.4, 1.0)])
def test_apg_equals_diffusers_normalized_guidance(eta, momentum, norm):
    apg = pytest.importorskip("diffusers.guiders.adaptive_projected_guidance")
    rule, w, row = APG(eta=eta, momentum=momentum, norm_threshold=norm), 2.0, ROWS["ddim"]
    alpha, sigma = row[:2]
    buffer, state = apg.MomentumBuffer(momentum), torch.zeros(B, 4, 9, 11)
    for seed in range(3):  # the momentum carries over steps
        t = inputs(seed=20 + seed, shape=(4, 9, 11))
        d_c, d_u = ((t["z"] - sigma * e) / alpha for e in t["eps2"].chunk(2))
        want = apg.normalized_guidance(d_c, d_u, w, buffer if momentum else None, eta=eta,
                                       norm_threshold=norm, use_original_formulation=True)
        _, got = step(t, row, rule, state=state, w=w)
        assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("p, max_value", [(0.995, 1.0), (0.9, 1.8), (0.5, 3.0), (1.0, 2.0)])
def test_dynamic_threshold_equals_diffusers_threshold_sample(p, max_value):
    schedulers = pytest.importorskip("diffusers.schedulers")
    scheduler = schedulers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=p,
                                         sample_max_value=max_value)
    t = inputs(seed=11, shape=(3, 9, 11), scale=2.0)
    row = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    _, x_hat = step(dict(t, eps2=t["eps2"][:B]), row, CFG(), DynamicThreshold(p, max_value))
    want = scheduler._threshold_sample(t["z"] - t["eps2"][:B])
    assert rel_err(x_hat, want) <= 1e-6


# --- parameters ----------------------------------------------------------------------------------

BAD_RULES = [
    (lambda: CFG(rescale=1.5), "rescale must be a number in \\[0, 1\\]"),
    (lambda: CFG(rescale=-0.1), "rescale must be"),
    (lambda: CFG(interval=(3.0, -1.0)), "lo ≤ hi"),
    (lambda: ZeroStar(interval=(1.0,)), "interval must be \\(lo, hi\\)"),
    (lambda: APG(interval=("a", 2)), "interval must be"),
    (lambda: APG(eta=-0.1), "eta must be"),
    (lambda: APG(momentum=1.0), "momentum must be a number in \\(-1, 1\\)"),
    (lambda: APG(norm_threshold=-2.0), "norm_threshold must be"),
    (lambda: APG(eta=math.nan), "eta must be"),
    (lambda: DynamicThreshold(p=0.0), "p must be a number in \\(0, 1\\]"),
    (lambda: DynamicThreshold(p=1.01), "p must be"),
    (lambda: DynamicThreshold(max_value=0.9), "max_value must be a number in \\[1, inf\\)"),
]


@pytest.mark.parametrize("make, match", BAD_RULES)
def test_bad_rule_parameters_give_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_rules_are_frozen_and_hashable():
    rule = CFG(rescale=0.5, interval=[-1, 3])
    assert rule.interval == (-1.0, 3.0) and hash(rule) == hash(CFG(0.5, (-1.0, 3.0)))
    with pytest.raises(dataclasses_error()):
        rule.rescale = 0.1


def dataclasses_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("kwargs, match", [
    (dict(rule="cfg"), "rule must be one of CFG, ZeroStar, APG"),
    (dict(rule=APG(momentum=0.5)), "needs state="),
    (dict(rule=APG(momentum=0.5), state=RowState(torch.zeros(B, 13, dtype=torch.float64))),
     "state.momentum must be float32"),
    (dict(state=RowState(momentum=torch.zeros(B + 1, 13))), "state.momentum must have shape"),
    (dict(state=RowState(x_hat=torch.zeros(B, 12))), "state.x_hat must have shape"),
    (dict(state=torch.zeros(B, 13)), "state must be a RowState"),
    (dict(clip=0.0), "clip must be None, a positive number or a DynamicThreshold"),
    (dict(clip="dynamic"), "clip must be"),
])
def test_bad_step_arguments_give_one_line_errors(kwargs, match):
    t = inputs(seed=12, shape=(13,))
    table = torch.tensor([ROWS["ddim"]], dtype=torch.float32)
    with pytest.raises(ValueError, match=match) as err:
        guided_step(t["eps2"], t["z"], W, table, 0, impl="torch", **kwargs)
    assert "\n" not in str(err.value)


def test_table_must_have_six_columns():
    t = inputs(seed=13, shape=(13,))
    with pytest.raises(ValueError, match="float32 \\[T, 6\\]"):
        guided_step(t["eps2"], t["z"], W, torch.zeros(4, 5), 0, impl="torch")


@pytest.mark.parametrize("numel", [2, 7, 1001, 3 * 64 * 64])
def test_dynamic_threshold_quantile_is_torch_quantile_linear(numel):
    """The per-sample scale takes its quantile by two selections, the way torch.quantile computes
    the "linear" one (which refuses inputs over 2²⁴ elements): equal to it, bit for bit."""
    x_hat = 3.0 * torch.randn(3, numel, generator=torch.Generator().manual_seed(numel))
    for p in (1e-3, 0.123, 0.5, 0.9, 0.995, 1.0):
        want = torch.quantile(x_hat.abs(), p, dim=1).clamp(1.0, 2.5)
        assert torch.equal(dynamic_threshold_scale(x_hat, DynamicThreshold(p, 2.5)), want)


SYNCS = ("item", "__bool__", "tolist", "numpy", "__int__", "__float__", "__index__")


def _forbidden(*args, **kwargs):
    raise AssertionError("host sync inside the step")


@pytest.mark.parametrize("clip", CLIPS)
def test_no_rule_waits_on_the_device(clip, monkeypatch):
    """Every rule and threshold with tensor w, step and table: nothing reads a tensor back."""
    t = inputs(seed=14, shape=(3, 5, 7))
    table = torch.tensor([ROWS["ddim"], ROWS["dpmpp_2m"]], dtype=torch.float32)
    state = t["state"].clone()
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, _forbidden)
    for rule in RULES.values():
        guided_step(t["eps2"], t["z"], W, table, torch.tensor(1), rule=rule,
                    state=RowState(momentum=state, x_hat=t["x_prev"]), clip=CLIPS[clip],
                    noise=CounterNoise(torch.tensor(3)), impl="torch")
