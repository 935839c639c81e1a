"""The guidance interval and per-sample state: the net sees 2B rows on steps with lo ≤ λ_t ≤ hi and
B rows elsewhere (decided on the host from the grid); chunking and batch size change no sample
for any rule with state (APG momentum, DPM-Solver++'s x̂_prev); an interval that excludes every
step is the w = 0 sampler."""
from __future__ import annotations

import pytest
import torch

import cfgengine
from cfgengine import APG, CFG, DynamicThreshold, ZeroStar
from cfgengine.sampler import Sampler
from cfgengine.schedule import logsnr_grid

LABELS = torch.tensor([0, 3, 1, 4, 2, 2, 0, 1, 3])
W = torch.tensor([0.0, 0.3, 1.0, 4.0, 0.3, 2.0, 0.5, 0.0, 1.5])
SAME_MATH_TOL = 1e-5
RULES = [CFG(), CFG(rescale=0.7), ZeroStar(), APG(eta=0.5, momentum=-0.5, norm_threshold=2.0)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("grid", ["cosine", "karras"])
@pytest.mark.parametrize("interval", [(-2.0, 3.0), (-20.0, 0.0), (1.5, 1.5)])
def test_net_sees_2b_rows_inside_the_window_and_b_outside(gmm, recorder, grid, interval):
    plain = recorder(gmm)
    cfgengine.sample(plain, LABELS, w=W, steps=12, grid=grid, guidance=CFG(interval=interval))
    lam = logsnr_grid(12, grid=grid).tolist()
    inside = [interval[0] <= x <= interval[1] for x in lam]
    assert [rows for rows, _ in plain.calls] == [18 if i else 9 for i in inside]
    for (rows, seen), i in zip(plain.calls, inside):
        expect = torch.cat([LABELS, torch.full((9,), 5)]) if i else LABELS
        assert torch.equal(seen, expect)


def test_window_ends_are_inclusive(gmm, recorder):
    lam = torch.tensor([-6.0, -2.0, 0.0, 2.0, 6.0], dtype=torch.float64)
    plain = recorder(gmm)
    cfgengine.sample(plain, LABELS, w=1.0, steps=None, logsnr=lam,
                     guidance=ZeroStar(interval=(-2.0, 2.0)))
    assert [rows for rows, _ in plain.calls] == [9, 18, 18, 18, 9]


@pytest.mark.parametrize("rule", [APG(momentum=0.5, interval=(-3.0, 3.0)),
                                  CFG(rescale=1.0, interval=(-3.0, 3.0))])
def test_unguided_steps_equal_the_w_zero_sampler_step_for_step(gmm, rule):
    """Outside the window every rule is ε̃ = ε_c: a window no step falls into is w = 0."""
    empty = type(rule)(**{**rule.__dict__, "interval": (100.0, 200.0)})
    for sampler in ("ddim", "dpmpp_2m"):
        got = cfgengine.sample(gmm, LABELS, w=W, steps=10, sampler=sampler, guidance=empty)
        ref = cfgengine.sample(gmm, LABELS, w=0.0, steps=10, sampler=sampler)
        assert torch.equal(got, ref)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("sampler", ["ancestral", "dpmpp_2m"])
def test_batch_size_and_prefixes_change_no_sample(gmm, rule, sampler):
    kwargs = dict(w=W, steps=10, sampler=sampler, guidance=rule, seed=3)
    whole = cfgengine.sample(gmm, LABELS, **kwargs)
    for batch_size in (2, 4):
        assert rel_err(cfgengine.sample(gmm, LABELS, batch_size=batch_size, **kwargs),
                       whole) < SAME_MATH_TOL
    prefix = cfgengine.sample(gmm, LABELS[:4], **{**kwargs, "w": W[:4]})
    assert rel_err(prefix, whole[:4]) < SAME_MATH_TOL


def test_sample_ids_key_rows_across_calls(gmm):
    """Rows 5..8 sampled alone with sample_ids 5..8 equal rows 5..8 of the whole batch."""
    rule = APG(momentum=0.3, interval=(-8.0, 8.0))
    whole = cfgengine.sample(gmm, LABELS, w=W, steps=9, guidance=rule, seed=2)
    part = cfgengine.sample(gmm, LABELS[5:], w=W[5:], steps=9, guidance=rule, seed=2,
                            sample_ids=torch.arange(5, 9))
    assert rel_err(part, whole[5:]) < SAME_MATH_TOL


def test_reused_sampler_restarts_state_for_every_call(gmm):
    engine = Sampler(gmm)
    kwargs = dict(w=W, steps=8, sampler="dpmpp_2m", guidance=APG(momentum=0.5), seed=1)
    first = engine.sample(LABELS, **kwargs)
    engine.sample(LABELS[:3], **{**kwargs, "w": 2.0})
    assert torch.equal(engine.sample(LABELS, **kwargs), first)


def test_compile_backend_runs_b_rows_outside_the_window(gmm, recorder, monkeypatch):
    """backend="compile" calls the compiled plain net outside the window (torch.compile replaced
    by the identity here: compiling costs tens of seconds on CPU)."""
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    plain = recorder(gmm)
    engine = Sampler(plain, backend="compile")
    engine.sample(LABELS, w=1.0, steps=6, guidance=CFG(interval=(-3.0, 3.0)))
    lam = logsnr_grid(6).tolist()
    assert [rows for rows, _ in plain.calls] == [18 if -3 <= x <= 3 else 9 for x in lam]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cudagraph_with_an_interval_equals_eager(gmm):
    labels = LABELS.cuda()
    kwargs = dict(w=W.cuda(), steps=10, sampler="dpmpp_2m", seed=4,
                  guidance=APG(momentum=0.5, interval=(-3.0, 3.0)))
    eager = Sampler(gmm, device="cuda", backend="torch").sample(labels, **kwargs)
    graph = Sampler(gmm, device="cuda", backend="cudagraph")
    assert rel_err(graph.sample(labels, **kwargs), eager) < 1e-4


BAD = [
    (dict(guidance="cfg"), "guidance must be"),
    (dict(guidance=DynamicThreshold()), "guidance must be"),
    (dict(clip=CFG()), "clip must be"),
    (dict(sample_ids=torch.arange(8)), "sample_ids"),
    (dict(sample_ids=-torch.arange(9)), "non-negative"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[m for _, m in BAD])
def test_bad_rule_settings_are_one_line_errors(gmm, recorder, kwargs, match):
    plain = recorder(gmm)
    with pytest.raises(ValueError, match=match) as err:
        cfgengine.sample(plain, LABELS, steps=6, **kwargs)
    assert "\n" not in str(err.value) and plain.calls == []


def test_interval_with_lo_above_hi_is_refused():
    with pytest.raises(ValueError, match="lo ≤ hi"):
        CFG(interval=(3.0, -3.0))
