"""CFG(refresh=k): the null branch runs on every k-th guided step, which stores Δ = ε_c − ε_u per
row; the guided steps between run the net on B rows and take ε̃ = ε_c + w·Δ. Checked by counting
the rows the net sees, against plain CFG at k = 1, against a float64 sampler written here from
the papers (Algorithm 2 and DDIM, Δ reuse by hand), and for chunk, batch and serving invariance.
"""
from __future__ import annotations

import math

import pytest
import torch

import cfgengine
from cfgengine import CFG, rng
from cfgengine.sampler import Sampler
from cfgengine.schedule import logsnr_grid

LABELS = torch.tensor([0, 3, 1, 4, 2, 2, 0, 1, 3])
W = torch.tensor([0.0, 0.3, 1.0, 4.0, 0.3, 2.0, 0.5, 0.0, 1.5])
B = LABELS.numel()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("k", [2, 3, 4])
def test_net_sees_2b_rows_on_refresh_steps_and_b_on_the_others(gmm, recorder, k):
    plain = recorder(gmm)
    cfgengine.sample(plain, LABELS, w=W, steps=10, guidance=CFG(refresh=k))
    assert [rows for rows, _ in plain.calls] == [2 * B if t % k == 0 else B for t in range(10)]
    for (rows, seen), t in zip(plain.calls, range(10)):
        expect = torch.cat([LABELS, torch.full((B,), 5)]) if t % k == 0 else LABELS
        assert torch.equal(seen, expect)


def test_refresh_counts_from_the_first_step_inside_the_interval(gmm, recorder):
    """Inside an interval the first guided step is a refresh step, whatever its index."""
    lam = logsnr_grid(12).tolist()
    plain = recorder(gmm)
    rule = CFG(refresh=3, interval=(lam[2], lam[9]))
    cfgengine.sample(plain, LABELS, w=1.0, steps=12, guidance=rule)
    assert [rows for rows, _ in plain.calls] == [
        2 * B if 2 <= t <= 9 and (t - 2) % 3 == 0 else B for t in range(12)]


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpmpp_2m"])
def test_refresh_one_equals_plain_cfg(gmm, sampler):
    assert CFG(refresh=1).row_state == () and CFG(refresh=1) == CFG()
    kwargs = dict(w=W, steps=9, sampler=sampler, seed=5)
    assert torch.equal(cfgengine.sample(gmm, LABELS, guidance=CFG(refresh=1), **kwargs),
                       cfgengine.sample(gmm, LABELS, **kwargs))


def _alpha_sigma(lam: float) -> tuple[float, float]:
    """α² = sigmoid(λ), σ² = sigmoid(−λ) (paper §2)."""
    return math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))


def _step64(z, x_hat, eps, lam, lam_next, sampler, noise):
    """One float64 step from the papers: Algorithm 2 (v = 0.3) or DDIM η = 0; the last step
    (λ' = None) returns x̂."""
    if lam_next is None:
        return x_hat
    alpha, sigma = _alpha_sigma(lam)
    alpha_n, sigma_n = _alpha_sigma(lam_next)
    if sampler == "ddim":  # z' = α'·x̂ + σ'·ε, ε = (z − α·x̂)/σ
        return alpha_n * x_hat + sigma_n * (z - alpha * x_hat) / sigma
    r = math.exp(lam - lam_next)
    mean = r * (alpha_n / alpha) * z + (1 - r) * alpha_n * x_hat
    var = ((1 - r) * sigma_n**2) ** 0.7 * ((1 - r) * sigma**2) ** 0.3
    return mean + math.sqrt(var) * noise


def _reference(model, labels, w, steps, sampler, k, seed, ids):
    """The refresh rule in float64, by hand: Δ stored on steps t ≡ 0 (mod k), ε̃ = ε_c + w·Δ."""
    lam = logsnr_grid(steps).tolist()
    shape = tuple(model.sample_shape)
    z = rng.randn_like_rows(seed, ids, 0, shape).double()
    w = w.double().reshape(-1, 1)
    null = torch.full_like(labels, model.num_classes)
    delta = None
    for t, lam_t in enumerate(lam):
        lam_rows = torch.full((labels.numel(),), lam_t, dtype=torch.float64)
        eps_c = model(z, lam_rows, labels)
        if t % k == 0:
            delta = eps_c - model(z, lam_rows, null)
        eps = eps_c + w * delta
        alpha, sigma = _alpha_sigma(lam_t)
        x_hat = (z - sigma * eps) / alpha
        noise = rng.randn_like_rows(seed, ids, t + 1, shape).double()
        z = _step64(z, x_hat, eps, lam_t, lam[t + 1] if t + 1 < steps else None, sampler, noise)
    return z


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
@pytest.mark.parametrize("k", [2, 3])
def test_refresh_matches_a_float64_reference(gmm, sampler, k):
    got = cfgengine.sample(gmm, LABELS, w=W, steps=11, sampler=sampler, guidance=CFG(refresh=k),
                           seed=7)
    want = _reference(gmm, LABELS, W, 11, sampler, k, 7, torch.arange(B))
    assert rel_err(got, want) < 1e-5
    plain = _reference(gmm, LABELS, W, 11, sampler, 1, 7, torch.arange(B))
    assert rel_err(plain, want) > 1e-3  # the reuse is visible: the test can fail


@pytest.mark.parametrize("sampler", ["ancestral", "dpmpp_2m"])
def test_cached_delta_is_per_row_under_chunks_batches_and_ids(gmm, sampler):
    kwargs = dict(w=W, steps=10, sampler=sampler, guidance=CFG(refresh=3), seed=3)
    whole = cfgengine.sample(gmm, LABELS, **kwargs)
    for batch_size in (1, 2, 4):
        assert rel_err(cfgengine.sample(gmm, LABELS, batch_size=batch_size, **kwargs),
                       whole) < 1e-6
    prefix = cfgengine.sample(gmm, LABELS[:4], **{**kwargs, "w": W[:4]})
    assert rel_err(prefix, whole[:4]) < 1e-6
    part = cfgengine.sample(gmm, LABELS[5:], **{**kwargs, "w": W[5:]},
                            sample_ids=torch.arange(5, 9))
    assert rel_err(part, whole[5:]) < 1e-6


def test_reused_sampler_restarts_delta_for_every_call(gmm):
    engine = Sampler(gmm)
    kwargs = dict(w=W, steps=8, guidance=CFG(refresh=2), seed=1)
    first = engine.sample(LABELS, **kwargs)
    engine.sample(LABELS[:3], **{**kwargs, "w": 3.0})
    assert torch.equal(engine.sample(LABELS, **kwargs), first)


def test_outside_the_interval_the_stored_delta_is_not_used(gmm):
    """After the interval the step is plain (w = 0), though Δ is still kept: float64 by hand,
    Δ refreshed at t = 0 and 2, reused at 1 and 3, ε̃ = ε_c from t = 4 on (DDIM η = 0)."""
    lam = logsnr_grid(10).tolist()
    rule = CFG(refresh=2, interval=(lam[0], lam[3]))
    got = cfgengine.sample(gmm, LABELS, w=W, steps=10, sampler="ddim", guidance=rule, seed=2)
    ids = torch.arange(B)
    z = rng.randn_like_rows(2, ids, 0, (2,)).double()
    null = torch.full_like(LABELS, 5)
    for t, lam_t in enumerate(lam):
        lam_rows = torch.full((B,), lam_t, dtype=torch.float64)
        eps = gmm(z, lam_rows, LABELS)
        if t in (0, 2):
            delta = eps - gmm(z, lam_rows, null)
        if t <= 3:
            eps = eps + W.double().reshape(-1, 1) * delta
        alpha, sigma = _alpha_sigma(lam_t)
        x_hat = (z - sigma * eps) / alpha
        z = _step64(z, x_hat, eps, lam_t, lam[t + 1] if t < 9 else None, "ddim", None)
    assert rel_err(got, z) < 1e-5


BAD = [(dict(refresh=0), "refresh must be an integer ≥ 1"),
       (dict(refresh=2.0), "refresh must be an integer ≥ 1"),
       (dict(refresh=True), "refresh must be an integer ≥ 1"),
       (dict(refresh=2, rescale=0.5), "one of rescale or refresh")]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[m for _, m in BAD])
def test_bad_refresh_is_a_one_line_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        CFG(**kwargs)
    assert "\n" not in str(err.value)


def test_a_guidance_embedded_net_refuses_refresh(gmm):
    class Embedded:
        num_classes, sample_shape, guidance_embedded = 5, (2,), True

        def __call__(self, z, logsnr, labels, w):
            return gmm(z, logsnr, labels)

    with pytest.raises(ValueError, match="only answers") as err:
        cfgengine.sample(Embedded(), LABELS, w=W, steps=4, guidance=CFG(refresh=2))
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cudagraph_with_refresh_and_an_interval_equals_eager(gmm):
    lam = logsnr_grid(12).tolist()
    kwargs = dict(w=W.cuda(), steps=12, sampler="dpmpp_2m", seed=4,
                  guidance=CFG(refresh=3, interval=(lam[1], lam[8])))
    eager = Sampler(gmm, device="cuda", backend="torch").sample(LABELS.cuda(), **kwargs)
    graph = Sampler(gmm, device="cuda", backend="cudagraph").sample(LABELS.cuda(), **kwargs)
    assert rel_err(graph, eager) < 1e-4
