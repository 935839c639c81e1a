"""The public sampling API (`cfgengine.sample`, `Sampler`) and the torch reference of the guided
step, against an independent float64 Algorithm 2 / DDIM and against itself under re-batching."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import cfgengine
from cfgengine import rng, toy
from cfgengine.kernels import CounterNoise, RowState, guided_step
from cfgengine.kernels.contract import check_step_args
from cfgengine.sampler import Sampler, sample
from cfgengine.schedule import alpha_sigma, logsnr_grid
from cfgengine.tables import coefficient_table

STEPS = 12
LABELS = torch.tensor([0, 3, 1, 4, 2, 2, 0, 1, 3])
SAME_MATH_TOL = 1e-5  # same per-row arithmetic, only batch layout differs
FP32_VS_FP64_TOL = 2e-4  # float32 sampler vs float64 reference (measured ≤ 4e-5 with clipping)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


# --------------------------------------------------------------------------------------------
# An independent float64 Algorithm 2 / DDIM, written from docs/design.md §1 (not from the table).

def reference_sample(model, labels, w, *, steps, sampler="ancestral", v=0.3, eta=0.0, clip=None,
                     seed=0, lam=None, z0=None):
    """x̂ of the last step; ε̃ from two float64 forwards (cond, null), noise keyed (seed, i, k);
    `lam` a float64 grid of `steps` points (default: the cosine grid), `z0` the start state."""
    n = labels.shape[0]
    ids = torch.arange(n)
    shape = tuple(model.sample_shape)
    w = torch.as_tensor(w, dtype=torch.float64).expand(n).reshape((-1,) + (1,) * len(shape))
    lam = logsnr_grid(steps) if lam is None else lam  # float64
    z = (rng.randn_like_rows(seed, ids, 0, shape) if z0 is None else z0).double()
    null = torch.full_like(labels, model.num_classes)
    x_prev = None
    for t in range(steps):
        alpha, sigma = (x.item() for x in alpha_sigma(lam[t]))
        lam_t = lam[t].expand(n)
        eps_c, eps_u = model(z, lam_t, labels), model(z, lam_t, null)
        eps = (1 + w) * eps_c - w * eps_u
        x_hat = (z - sigma * eps) / alpha
        if clip is not None:
            x_hat = x_hat.clamp(-clip, clip)
        if t == steps - 1:
            return x_hat
        noise = rng.randn_like_rows(seed, ids, t + 1, shape).double()
        a1, s1 = (x.item() for x in alpha_sigma(lam[t + 1]))
        if sampler == "dpmpp_2m":
            z, x_prev = dpmpp_2m_update(z, x_hat, x_prev, lam, t, sigma, a1, s1), x_hat
        elif sampler == "ancestral":
            r = math.exp(lam[t].item() - lam[t + 1].item())
            mean = r * (a1 / alpha) * z + (1 - r) * a1 * x_hat
            var = ((1 - r) * s1**2) ** (1 - v) * ((1 - r) * sigma**2) ** v
            z = mean + math.sqrt(var) * noise
        else:
            s = eta * (s1 / sigma) * math.sqrt(1 - alpha**2 / a1**2)
            eps_hat = (z - alpha * x_hat) / sigma  # ε re-derived from the clipped x̂
            z = a1 * x_hat + math.sqrt(s1**2 - s**2) * eps_hat + s * noise


def dpmpp_2m_update(z, x_hat, x_prev, lam, t, sigma, alpha_next, sigma_next):
    """DPM-Solver++(2M): h = (λ' − λ)/2, D = x̂ on the first step and the step into λ_{T−1}, else
    D = (1 + 1/(2r))·x̂ − x̂_prev/(2r), r = h_prev/h; z' = (σ'/σ)·z + α'·(1 − e^(−h))·D."""
    h = (lam[t + 1] - lam[t]).item() / 2
    if t == 0 or t == lam.numel() - 2:
        d = x_hat
    else:
        r = (lam[t] - lam[t - 1]).item() / 2 / h
        d = (1 + 1 / (2 * r)) * x_hat - x_prev / (2 * r)
    return (sigma_next / sigma) * z + alpha_next * (1 - math.exp(-h)) * d


@pytest.fixture(scope="module")
def images():
    """Small image mixture (K = 4, [1, 8, 8], clip = 1)."""
    return toy.image_mixture(num_classes=4, shape=(1, 8, 8), seed=1)


@pytest.mark.parametrize("sampler, v, eta", [("ancestral", 0.3, 0.0), ("ancestral", 1.0, 0.0),
                                             ("ddim", 0.3, 0.0), ("ddim", 0.3, 1.0),
                                             ("dpmpp_2m", 0.3, 0.0)])
@pytest.mark.parametrize("w", [0.0, 0.3, 2.0])
def test_sample_matches_float64_algorithm2_on_gmm(gmm, sampler, v, eta, w):
    got = sample(gmm, LABELS, w=w, steps=STEPS, sampler=sampler, v=v, eta=eta, seed=5)
    ref = reference_sample(gmm, LABELS, w, steps=STEPS, sampler=sampler, v=v, eta=eta, seed=5)
    assert got.shape == (9, 2) and got.dtype == torch.float32
    assert rel_err(got, ref) < FP32_VS_FP64_TOL


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpmpp_2m"])
def test_sample_matches_float64_reference_with_clipping(images, sampler):
    labels = torch.tensor([0, 3, 1, 2, 3])
    w = torch.tensor([0.0, 0.3, 1.0, 4.0, 0.1])
    got = sample(images, labels, w=w, steps=10, sampler=sampler, eta=0.5, seed=9)
    ref = reference_sample(images, labels, w, steps=10, sampler=sampler, eta=0.5, clip=1.0, seed=9)
    assert got.shape == (5, 1, 8, 8)
    assert got.abs().max().item() <= 1.0
    assert rel_err(got, ref) < FP32_VS_FP64_TOL


# --------------------------------------------------------------------------------------------
# Sample i depends only on (seed, i, labels[i], w[i], settings): never on N, batch_size, reuse.

def run(model, labels=LABELS, **kwargs):
    kwargs = {"w": 0.3, "steps": STEPS, "seed": 7, **kwargs}
    return sample(model, labels, **kwargs)


@pytest.mark.parametrize("k", [1, 4])
def test_prefix_of_labels_gives_prefix_of_samples(gmm, k):
    assert rel_err(run(gmm, LABELS[:k]), run(gmm)[:k]) < SAME_MATH_TOL


@pytest.mark.parametrize("batch_size", [2, 4, 100])
def test_batch_size_does_not_change_samples(gmm, batch_size):
    assert rel_err(run(gmm, batch_size=batch_size), run(gmm)) < SAME_MATH_TOL


def test_other_rows_labels_and_w_do_not_change_a_row(gmm):
    other_labels = LABELS.clone()
    other_labels[1:] = (other_labels[1:] + 1) % 5
    w = torch.full((9,), 0.3)
    w[1:] = 2.0
    assert rel_err(run(gmm, other_labels, w=w)[0], run(gmm)[0]) < SAME_MATH_TOL


def test_seed_changes_samples(gmm):
    assert rel_err(run(gmm, seed=8), run(gmm)) > 0.1


def test_int32_labels_equal_int64_labels(gmm):
    assert torch.equal(run(gmm, LABELS.int()), run(gmm))


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_per_sample_w_equals_separate_scalar_calls(gmm, sampler):
    values = [0.0, 0.3, 1.0, 4.0]
    w = torch.tensor([values[i % 4] for i in range(9)])
    mixed = run(gmm, w=w, sampler=sampler, eta=0.4)
    for value in values:
        rows = w == value
        alone = run(gmm, w=value, sampler=sampler, eta=0.4)
        assert rel_err(mixed[rows], alone[rows]) < SAME_MATH_TOL


def test_sampler_reuse_equals_fresh_calls(gmm):
    engine = Sampler(gmm)
    first = engine.sample(LABELS, w=0.3, steps=STEPS, seed=7)
    engine.sample(LABELS[:3], w=1.0, steps=9, sampler="ddim", eta=0.5, seed=1)
    engine.sample(LABELS, w=0.3, steps=STEPS, v=1.0, seed=7)
    again = engine.sample(LABELS, w=0.3, steps=STEPS, seed=7)
    assert torch.equal(first, again)
    assert torch.equal(first, run(gmm))
    assert rel_err(engine.sample(LABELS[:3], w=1.0, steps=9, sampler="ddim", eta=0.5, seed=1),
                   run(gmm, LABELS[:3], w=1.0, steps=9, sampler="ddim", eta=0.5, seed=1)) == 0


def test_cfgengine_sample_is_the_public_entry(gmm):
    assert torch.equal(cfgengine.sample(gmm, LABELS, w=0.3, steps=STEPS, seed=7), run(gmm))


# --------------------------------------------------------------------------------------------
# The loop makes no host sync (docs/design.md §4): run `_sample_chunk` with syncs patched to raise.

SYNCS = ("item", "__bool__", "tolist", "numpy", "__int__", "__float__", "__index__")


def _forbidden(*args, **kwargs):
    raise AssertionError("host sync inside the sampling loop")


LOOP_SETTINGS = [("ancestral", None), ("ddim", None), ("dpmpp_2m", None),
                 ("dpmpp_2m", cfgengine.APG(momentum=-0.5, interval=(-5.0, 5.0))),
                 ("ancestral", cfgengine.CFG(rescale=0.7, interval=(-2.0, 30.0)))]


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("sampler, rule", LOOP_SETTINGS)
def test_sampling_loop_makes_no_host_sync(gmm, monkeypatch, guided, sampler, rule):
    engine = Sampler(gmm)
    call = engine._call(STEPS, sampler, 0.3, 0.5, "cosine", None, None, rule, "auto", 7, None)
    plan = engine.plan(call)  # built before the loop, on the host
    plan = plan if guided else plan.unguided()
    w = torch.full((9,), 0.3 if guided else 0.0)
    args = (call, plan, LABELS, w, torch.arange(9), None)
    expected = engine._sample_chunk(*args)
    with monkeypatch.context() as patch:
        for name in SYNCS:
            patch.setattr(torch.Tensor, name, _forbidden)
        got = engine._sample_chunk(*args)
    assert torch.equal(got, expected)
    assert torch.equal(got, run(gmm, w=w, sampler=sampler, v=0.3, eta=0.5, guidance=rule))


def test_sync_patch_is_effective():
    with pytest.MonkeyPatch.context() as patch:
        for name in SYNCS:
            patch.setattr(torch.Tensor, name, _forbidden)
        with pytest.raises(AssertionError, match="host sync"):
            bool(torch.ones(1) > 0)
        with pytest.raises(AssertionError, match="host sync"):
            torch.ones(1).item()


# --------------------------------------------------------------------------------------------
# Bad input: ValueError naming the problem, raised before any sampling.

BAD_INPUTS = [
    (torch.tensor([0, 5]), {}, "null label"),
    (torch.tensor([0, 6]), {}, r"\[0, 5\)"),
    (torch.tensor([-1, 2]), {}, r"\[0, 5\)"),
    (torch.tensor([0.0, 1.0]), {}, "labels"),
    (torch.tensor([[0, 1]]), {}, "1-D"),
    ([0, 1], {}, "labels"),
    (torch.tensor([], dtype=torch.int64), {}, "empty"),
    (None, {}, "n"),
    (None, {"n": 0}, "n"),
    (LABELS, {"steps": 1}, "steps"),
    (LABELS, {"steps": 2.5}, "steps"),
    (LABELS, {"w": math.nan}, "w"),
    (LABELS, {"w": math.inf}, "w"),
    (LABELS, {"w": torch.tensor([0.3, math.nan] + [0.0] * 7)}, "w"),
    (LABELS, {"w": torch.zeros(8)}, "w"),
    (LABELS, {"w": torch.zeros(9, 1)}, "w"),
    (LABELS, {"v": 1.5}, "v"),
    (LABELS, {"v": -0.1}, "v"),
    (LABELS, {"sampler": "ddim", "eta": 2.0}, "eta"),
    (LABELS, {"eta": -1.0}, "eta"),
    (LABELS, {"sampler": "euler"}, "sampler"),
    (LABELS, {"seed": -1}, "seed"),
    (LABELS, {"seed": 2**63}, "seed"),
    (LABELS, {"seed": 1.5}, "seed"),
    (LABELS, {"batch_size": 0}, "batch_size"),
    (LABELS, {"batch_size": -2}, "batch_size"),
    (LABELS, {"batch_size": 2.0}, "batch_size"),
    (LABELS, {"clip": 0}, "clip"),
    (LABELS, {"clip": -1.0}, "clip"),
    (LABELS, {"clip": "yes"}, "clip"),
    (LABELS, {"clip": math.nan}, "clip"),
    (LABELS, {"shape": (0,)}, "shape"),
    (LABELS, {"clip": True}, "clip"),
    (LABELS, {"n": 3}, "n is only"),
    (LABELS > 2, {}, "labels"),
]


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        nan = "-with-nan" if value.is_floating_point() and bool(value.isnan().any()) else ""
        return f"Tensor{list(value.shape)}{nan}" if value.numel() > 4 else f"{value.tolist()}"
    return f"list{value}" if isinstance(value, list) else repr(value)


def _describe(labels, kwargs) -> str:
    parts = [] if labels is LABELS else [f"labels={_short(labels)}"]
    return ",".join(parts + [f"{k}={_short(v)}" for k, v in kwargs.items()])


@pytest.mark.parametrize("labels, kwargs, match", BAD_INPUTS,
                         ids=[_describe(labels, kwargs) for labels, kwargs, _ in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_it(gmm, recorder, labels, kwargs, match):
    plain = recorder(gmm)
    with pytest.raises(ValueError, match=match):
        sample(plain, labels, **{"steps": STEPS, **kwargs})
    assert plain.calls == []


BAD_ENGINE = [({"backend": "onnx-ish"}, "backend"), ({"precision": "fp8"}, "precision"),
              ({"device": "foo"}, "device"), ({"device": "meta"}, "meta")]
if not torch.cuda.is_available():
    BAD_ENGINE += [({"device": "cuda"}, "cuda"), ({"backend": "cudagraph"}, "cudagraph")]


@pytest.mark.parametrize("kwargs, match", BAD_ENGINE)
def test_bad_engine_settings_raise(gmm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(gmm, **kwargs)


# --------------------------------------------------------------------------------------------
# The guided step's torch reference (kernels/reference.py) against a direct float64 computation.

B, S = 5, (3, 7)


def step_inputs(seed: int, batch: int = B, doubled: bool = True):
    gen = torch.Generator().manual_seed(seed)
    eps2 = torch.randn(((2 if doubled else 1) * batch, *S), generator=gen)
    z = torch.randn((batch, *S), generator=gen)
    noise = torch.randn((batch, *S), generator=gen)
    w = torch.rand(batch, generator=gen) * 3
    return eps2, z, w, noise


def direct_step(eps2, z, w, row, noise, clip=None):
    """(z', x̂) in float64 from one table row (α, σ, c_z, c_x, s, c_p = 0) and eq. 6."""
    alpha, sigma, c_z, c_x, s, c_p = row.double().tolist()
    assert c_p == 0
    batch = z.shape[0]
    eps_c, z, noise = eps2[:batch].double(), z.double(), noise.double()
    if eps2.shape[0] == 2 * batch:
        w = torch.as_tensor(w, dtype=torch.float64).expand(batch).reshape(-1, 1, 1)
        eps = (1 + w) * eps_c - w * eps2[batch:].double()
    else:
        eps = eps_c
    x_hat = (z - sigma * eps) / alpha
    if clip is not None:
        x_hat = x_hat.clamp(-clip, clip)
    return c_z * z + c_x * x_hat + s * noise, x_hat


TABLE = coefficient_table(9, "ancestral", v=0.3)
STEP_TOL = 1e-5
reference_step = functools.partial(guided_step, impl="torch")


@pytest.mark.parametrize("step", [0, 3, 7, 8])
@pytest.mark.parametrize("w_kind", ["scalar", "tensor"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_guided_step_with_given_noise_equals_direct_computation(step, w_kind, clip):
    eps2, z, w, noise = step_inputs(step)
    w_arg = 0.7 if w_kind == "scalar" else w
    z_next = reference_step(eps2, z, w_arg, TABLE, step, clip=clip, noise=noise)
    ref, _ = direct_step(eps2, z, w_arg, TABLE[step], noise, clip)
    assert z_next.shape == z.shape and z_next.dtype == torch.float32
    assert rel_err(z_next, ref) < STEP_TOL


# fp32 arithmetic on the stored values, one rounding to the storage dtype at the end: the error
# against float64 of the same (rounded) inputs is the dtype's half-ulp, with margin.
STORAGE_TOL = {torch.float32: STEP_TOL, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", list(STORAGE_TOL))
def test_guided_step_low_precision_storage_rounds_once(dtype):
    eps2, z, w, noise = (t.to(dtype) for t in step_inputs(11))
    z_next = reference_step(eps2, z, w.float(), TABLE, 3, noise=noise)
    ref, _ = direct_step(eps2, z, w.float(), TABLE[3], noise)
    assert z_next.dtype == dtype
    assert rel_err(z_next, ref) < STORAGE_TOL[dtype]


def test_guided_step_b_row_eps_means_no_guidance():
    eps2, z, w, noise = step_inputs(1, doubled=False)
    ref, _ = direct_step(eps2, z, 0.0, TABLE[2], noise)
    assert rel_err(reference_step(eps2, z, w, TABLE, 2, noise=noise), ref) < STEP_TOL


@pytest.mark.parametrize("step", [0, 4])
def test_guided_step_in_kernel_noise_is_keyed_by_seed_id_and_step(step):
    eps2, z, w, _ = step_inputs(2)
    ids = torch.tensor([3, 2**33, 0, 17, 4])
    noise = rng.randn_like_rows(2**40 + 1, ids, step + 1, S)
    expected = reference_step(eps2, z, w, TABLE, step, noise=noise)
    got = reference_step(eps2, z, w, TABLE, step, noise=CounterNoise(2**40 + 1, ids))
    assert rel_err(got, expected) < STEP_TOL
    default_ids = reference_step(eps2, z, w, TABLE, step, noise=CounterNoise(2**40 + 1))
    assert rel_err(default_ids, reference_step(eps2, z, w, TABLE, step,
                                               noise=CounterNoise(2**40 + 1, torch.arange(B)))) == 0
    assert torch.equal(reference_step(eps2, z, w, TABLE, step),
                       reference_step(eps2, z, w, TABLE, step, noise=CounterNoise(0)))


def test_guided_step_tensor_step_and_seed_equal_int():
    eps2, z, w, _ = step_inputs(3)
    ref = reference_step(eps2, z, w, TABLE, 4, noise=CounterNoise(11))
    got = reference_step(eps2, z, w, TABLE, torch.tensor(4), noise=CounterNoise(torch.tensor(11)))
    assert rel_err(got, ref) < STEP_TOL


def test_guided_step_per_row_steps_equal_separate_calls():
    eps2, z, w, _ = step_inputs(4)
    steps = torch.tensor([0, 8, 3, 3, 6])
    ids = torch.tensor([10, 11, 2**32 + 12, 13, 14])
    got = reference_step(eps2, z, w, TABLE, steps, noise=CounterNoise(5, ids), clip=1.0)
    for i in range(B):
        row_eps2 = eps2[[i, B + i]]
        alone = reference_step(row_eps2, z[i:i + 1], w[i:i + 1], TABLE, int(steps[i]),
                               noise=CounterNoise(5, ids[i:i + 1]), clip=1.0)
        assert rel_err(got[i:i + 1], alone) < STEP_TOL


def test_guided_step_fills_every_output_buffer():
    eps2, z, w, noise = step_inputs(5)
    out = torch.full_like(z, math.nan)
    x_hat_out = torch.full_like(z, math.nan)  # TABLE's c_p = 0: the kept x̂ is only written
    ret = reference_step(eps2, z, w, TABLE, 2, noise=noise, out=out,
                         state=RowState(x_hat=x_hat_out))
    ref, x_hat = direct_step(eps2, z, w, TABLE[2], noise)
    assert ret is out
    assert rel_err(out, ref) < STEP_TOL and rel_err(x_hat_out, x_hat) < STEP_TOL
    out2 = torch.full((2 * B, *S), math.nan)
    reference_step(eps2, z, w, TABLE, 2, noise=noise, out=out2)
    assert torch.equal(out2[:B], out) and torch.equal(out2[B:], out)


def test_guided_step_out_of_2b_rows_returns_its_first_half():
    eps2, z, w, noise = step_inputs(10)
    out2 = torch.full((2 * B, *S), math.nan)
    ret = reference_step(eps2, z, w, TABLE, 2, noise=noise, out=out2)
    ref, _ = direct_step(eps2, z, w, TABLE[2], noise)
    assert rel_err(out2[:B], ref) < STEP_TOL and torch.equal(out2[B:], out2[:B])
    assert torch.equal(ret, out2[:B])


def test_guided_step_last_row_returns_x_hat():
    eps2, z, w, noise = step_inputs(6)
    x_hat_out = torch.full_like(z, math.nan)
    z_next = reference_step(eps2, z, w, TABLE, 8, noise=noise, state=RowState(x_hat=x_hat_out),
                            clip=1.0)
    assert rel_err(z_next, x_hat_out) < STEP_TOL


def test_guided_step_does_not_modify_inputs():
    eps2, z, w, noise = step_inputs(7)
    copies = [t.clone() for t in (eps2, z, w, noise)]
    reference_step(eps2, z, w, TABLE, 1, noise=noise, clip=1.0)
    assert all(torch.equal(a, b) for a, b in zip((eps2, z, w, noise), copies))


def _bad_step_args():
    eps2, z, w, noise = step_inputs(8)
    good = dict(eps2=eps2, z=z, w=w, table=TABLE, step=1, noise=None, out=None, state=None,
                impl="auto")
    cases = [
        ({"impl": "cuda"}, "impl"),
        ({"eps2": eps2[:3]}, "eps2"),
        ({"eps2": eps2[:, :2]}, "eps2"),
        ({"table": TABLE.double()}, "table"),
        ({"table": TABLE[:, :4]}, "table"),
        ({"table": TABLE[0]}, "table"),
        ({"step": 9}, "step"),
        ({"step": -1}, "step"),
        ({"step": torch.tensor([1, 2])}, "step"),
        ({"w": torch.zeros(3)}, "w"),
        ({"noise": noise[:2]}, "noise"),
        ({"noise": 3}, "noise must be a Tensor, a CounterNoise or None"),
        ({"out": torch.empty(B, 7, 3)}, "out"),
        ({"state": RowState(x_hat=torch.empty(B + 1, *S))}, "state.x_hat"),
        ({"out": torch.empty(B + 1, *S)}, "out"),
    ]
    return [pytest.param({**good, **change}, match, id=f"{match}-{i}")
            for i, (change, match) in enumerate(cases)]


@pytest.mark.parametrize("args, match", _bad_step_args())
def test_check_step_args_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        check_step_args(**args)
    with pytest.raises(ValueError, match=match):
        guided_step(args["eps2"], args["z"], args["w"], args["table"], args["step"],
                    noise=args["noise"], out=args["out"], state=args["state"], impl=args["impl"])


def test_check_step_args_accepts_valid_shapes():
    eps2, z, w, noise = step_inputs(9)
    check_step_args(eps2, z, 0.3, TABLE, torch.tensor(2), noise=noise, out=torch.empty_like(z),
                    state=RowState(x_hat=torch.empty_like(z)), impl="torch")
    check_step_args(eps2, z, 0.3, TABLE, torch.tensor(2), noise=CounterNoise(3),
                    out=torch.empty_like(eps2), impl="torch")
    check_step_args(eps2[:B], z, w, TABLE, torch.arange(B), impl="auto")

