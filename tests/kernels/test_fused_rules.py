"""The Triton path of every guidance rule and threshold (the row-stats pass + the fused step)
against the torch reference, which tests/test_guidance_rules.py checks against float64 math.

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py), small sizes: the interpreter is slow.
Outputs are NaN-poisoned before each call; comparisons are ‖Δ‖/‖ref‖.
"""
from __future__ import annotations

import pytest
import torch

import cfgengine.kernels.step as dispatch
from cfgengine import APG, CFG, DynamicThreshold, ZeroStar
from cfgengine.kernels import CounterNoise, RowState, guided_step

pytestmark = pytest.mark.skipif(not dispatch.triton_installed(),
                                reason="triton is not installed (non-Linux)")
launch = pytest.importorskip("cfgengine.kernels.launch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 2e-6
SHAPE = (3, 17, 19)  # D = 969: not a power of two, not a multiple of 4
W = torch.tensor([0.0, 0.3, 4.0, 1.5])
B = W.numel()

# (α, σ, c_z, c_x, s, c_p): a DDIM η = 0.5 row, a DPM-Solver++(2M) row (c_p ≠ 0), the last row.
TABLE = torch.tensor([[0.6, 0.8, 0.9, 0.1, 0.3, 0.0],
                      [0.75, 0.66, 0.85, 0.6, 0.0, -0.12],
                      [0.99, 0.14, 0.0, 1.0, 0.0, 0.0]])
STEPS = torch.tensor([0, 1, 1, 0])  # per-row: both kinds of row in one call
RULES = {
    "cfg": CFG(),
    "cfg-rescale": CFG(rescale=0.7),
    "zero-star": ZeroStar(),
    "apg": APG(eta=0.3, momentum=-0.5, norm_threshold=3.0),
    "apg-no-state": APG(eta=1.0),
}
CLIPS = {"none": None, "static": 1.0, "dynamic": DynamicThreshold(p=0.9, max_value=1.6)}


@pytest.fixture(autouse=True)
def on_test_device():
    with torch.device(DEVICE):
        yield


def inputs(seed: int, batch: int = B, shape=SHAPE, dtype=torch.float32):
    """eps2 [2B], z, x̂_prev, noise, APG state (fp32), from a CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda rows, scale=1.0: (scale * torch.randn((rows, *shape), generator=gen,
                                                        device="cpu")).to(DEVICE)
    return dict(eps2=draw(2 * batch).to(dtype), z=draw(batch, 1.5).to(dtype),
                x_prev=draw(batch).to(dtype), noise=draw(batch).to(dtype), state=draw(batch))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def run(impl, t, rule, clip=None, w=W, steps=STEPS, noise=True, **kwargs):
    """One step into a NaN-poisoned 2B-row out, x̂ kept from x̂_prev; returns (z', x̂, momentum
    after)."""
    momentum = t["state"].clone() if isinstance(rule, APG) and rule.momentum else None
    x_hat = t["x_prev"].clone()  # read as x̂_prev where c_p ≠ 0, then overwritten with x̂
    out = torch.full((2 * t["z"].shape[0],) + t["z"].shape[1:], float("nan"), dtype=t["z"].dtype)
    z_next = guided_step(t["eps2"], t["z"], w, TABLE, steps, rule=rule, clip=clip,
                         state=RowState(momentum=momentum, x_hat=x_hat),
                         noise=t["noise"] if noise else CounterNoise(7), out=out, impl=impl,
                         **kwargs)
    for buffer in (out, x_hat):
        assert not buffer.isnan().any(), "an output element was left unwritten"
    assert torch.equal(out[: z_next.shape[0]], z_next) and torch.equal(out[z_next.shape[0]:], z_next)
    return z_next, x_hat, momentum


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("rule", RULES)
def test_kernel_equals_reference_for_every_rule(rule, clip):
    t = inputs(seed=1)
    got = run("triton", t, RULES[rule], CLIPS[clip])
    want = run("torch", t, RULES[rule], CLIPS[clip])
    for g, r in zip(got, want):
        if r is not None:
            assert rel_err(g, r) <= FP32_TOL


@pytest.mark.parametrize("rule", ["cfg-rescale", "zero-star", "apg"])
def test_in_kernel_noise_and_scalar_forms(rule):
    t = inputs(seed=2)
    args = dict(w=torch.tensor(2.0), steps=torch.tensor(0), noise=False)
    got = run("triton", t, RULES[rule], 1.0, **args)
    want = run("torch", t, RULES[rule], 1.0, **args)
    assert rel_err(got[0], want[0]) <= 1e-5  # Philox's normals agree to 1e-5 (rng.py)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["cfg-rescale", "zero-star", "apg"])
def test_low_precision_storage_rounds_once(rule, dtype):
    """Loaded as stored, computed in fp32, rounded once: within 2× the rounding of z' itself."""
    t = inputs(seed=3, dtype=dtype)
    got = run("triton", t, RULES[rule], CLIPS["dynamic"] if rule == "apg" else 1.0)[0]
    t32 = {k: v.float() for k, v in t.items()}
    truth = run("torch", t32, RULES[rule], CLIPS["dynamic"] if rule == "apg" else 1.0)[0]
    assert got.dtype == dtype
    assert rel_err(got, truth) <= 2 * rel_err(truth.to(dtype), truth)


@pytest.mark.parametrize("rule", ["cfg-rescale", "zero-star", "apg"])
def test_many_slices_per_row_and_strided_rows(rule, monkeypatch):
    """Small tiles make the reduction pass split each row into slices (some partial, one empty),
    several tiles to a slice; a capped grid makes both kernels stride over rows."""
    monkeypatch.setattr(launch, "MAX_SPLIT", 4)
    monkeypatch.setattr(launch, "MAX_GRID_ROWS", 1)
    t = inputs(seed=4, shape=(70,))
    # 5 tiles of 16 → 4 slices of 2 tiles: [0, 32), [32, 64), [64, 70) partial, [96, …) empty
    config = launch.LaunchConfig(block_rows=2, block_d=16, num_warps=4)
    rule = RULES[rule]
    state = RowState(momentum=t["state"].clone(), x_hat=t["x_prev"].clone())
    got = launch.guided_step_triton(t["eps2"], t["z"], W, TABLE, STEPS, rule=rule, state=state,
                                    noise=t["noise"], config=config)
    ref_state = RowState(momentum=t["state"].clone(), x_hat=t["x_prev"].clone())
    want = guided_step(t["eps2"], t["z"], W, TABLE, STEPS, rule=rule, state=ref_state,
                       noise=t["noise"], impl="torch")
    assert rel_err(got, want) <= FP32_TOL
    assert rel_err(state.momentum, ref_state.momentum) <= FP32_TOL


@pytest.mark.parametrize("rule", ["cfg-rescale", "zero-star", "apg"])
def test_w_zero_rows_equal_the_unguided_step(rule):
    t = inputs(seed=5)
    w = torch.zeros(B)
    guided = run("triton", t, RULES[rule], 1.0, w=w)
    plain = run("triton", dict(t, eps2=t["eps2"][:B]), CFG(), 1.0, w=w)
    assert torch.equal(guided[0], plain[0]) and torch.equal(guided[1], plain[1])


def test_apg_state_is_per_row_under_chunking():
    """Row i's z' and momentum never depend on the other rows: chunks of 1 and 3 rows give the
    full batch's results (bitwise under the interpreter), over two steps."""
    rule, steps = RULES["apg"], torch.tensor([0, 1, 0, 1])
    whole, parts = torch.zeros(B, *SHAPE), torch.zeros(B, *SHAPE)
    for seed in (6, 7):
        t = inputs(seed=seed)
        full = guided_step(t["eps2"], t["z"], W, TABLE, steps, rule=rule,
                           state=RowState(momentum=whole, x_hat=t["x_prev"].clone()),
                           noise=CounterNoise(3), impl="triton")
        for rows in (slice(0, 1), slice(1, 4)):
            eps2 = torch.cat([t["eps2"][:B][rows], t["eps2"][B:][rows]])
            chunk_state = RowState(momentum=parts[rows], x_hat=t["x_prev"][rows].clone())
            part = guided_step(eps2, t["z"][rows], W[rows], TABLE, steps[rows], rule=rule,
                               state=chunk_state,  # views: updated in place
                               noise=CounterNoise(3, torch.arange(B)[rows]), impl="triton")
            tol = 0.0 if launch.INTERPRETED else 1e-6
            assert rel_err(part, full[rows]) <= tol
            assert rel_err(parts[rows], whole[rows]) <= tol


def test_dynamic_threshold_with_x_hat_read_then_overwritten():
    t = inputs(seed=8)
    clip, rule = CLIPS["dynamic"], RULES["cfg-rescale"]
    results = {}
    for impl in ("triton", "torch"):
        buffer = t["x_prev"].clone()
        z_next = guided_step(t["eps2"], t["z"], W, TABLE, STEPS, rule=rule, clip=clip,
                             state=RowState(x_hat=buffer), noise=t["noise"], impl=impl)
        results[impl] = (z_next, buffer)
    for g, r in zip(results["triton"], results["torch"]):
        assert rel_err(g, r) <= FP32_TOL


def test_missing_x_hat_prev_gives_nan_rows_where_c_p_is_not_zero():
    t = inputs(seed=9)
    got = guided_step(t["eps2"], t["z"], W, TABLE, STEPS, noise=t["noise"], impl="triton")
    assert got[STEPS == 1].isnan().all() and not got[STEPS == 0].isnan().any()


def test_unguided_step_leaves_apg_state():
    t = inputs(seed=10)
    state = t["state"].clone()
    got = guided_step(t["eps2"][:B], t["z"], W, TABLE, STEPS, rule=RULES["apg"],
                      state=RowState(momentum=state, x_hat=t["x_prev"].clone()),
                      noise=t["noise"], impl="triton")
    want = guided_step(t["eps2"][:B], t["z"], W, TABLE, STEPS,
                       state=RowState(x_hat=t["x_prev"].clone()), noise=t["noise"], impl="torch")
    assert torch.equal(state, t["state"]) and rel_err(got, want) <= FP32_TOL


def test_launcher_rejects_a_strided_state():
    t = inputs(seed=11)
    state = torch.zeros(B, *SHAPE[::-1]).transpose(1, 3)
    with pytest.raises(ValueError, match="state.momentum must be contiguous"):
        guided_step(t["eps2"], t["z"], W, TABLE, STEPS, rule=RULES["apg"],
                    state=RowState(momentum=state, x_hat=t["x_prev"]), impl="triton")
