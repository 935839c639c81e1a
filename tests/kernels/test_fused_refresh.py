"""CFG(refresh=k) in the fused Triton step against the torch reference (which tests/test_refresh.py
checks against float64 math): a step with 2B rows stores Δ = ε_c − ε_u, one with B rows reads it
back for ε̃ = ε_c + w·Δ. Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

from cfgengine import CFG
from cfgengine.kernels import CounterNoise, RowState, guided_step
from tests.kernels.test_fused_rules import (B, CLIPS, FP32_TOL, SHAPE, STEPS, TABLE, W,  # noqa: F401
                                            inputs, launch, on_test_device, pytestmark, rel_err)

RULE = CFG(refresh=2)


def run(impl, t, doubled: bool, clip=None, w=W, steps=STEPS, noise=True):
    """One step, 2B rows (Δ stored) or B rows (Δ read, from the inputs' fp32 "state");
    returns (z', x̂, Δ after)."""
    delta, x_hat = t["state"].clone(), t["x_prev"].clone()
    eps2 = t["eps2"] if doubled else t["eps2"][:B]
    z_next = guided_step(eps2, t["z"], w, TABLE, steps, rule=RULE, clip=clip,
                         state=RowState(delta=delta, x_hat=x_hat),
                         noise=t["noise"] if noise else CounterNoise(7), impl=impl)
    return z_next, x_hat, delta


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("doubled", [True, False], ids=["refresh-step", "reuse-step"])
def test_kernel_equals_reference(doubled, clip):
    t = inputs(seed=1)
    got, want = run("triton", t, doubled, CLIPS[clip]), run("torch", t, doubled, CLIPS[clip])
    for g, r in zip(got, want):
        assert rel_err(g, r) <= FP32_TOL
    if doubled:  # Δ = ε_c − ε_u, stored exactly
        assert torch.equal(got[2], t["eps2"][:B] - t["eps2"][B:])
    else:  # read, not written
        assert torch.equal(got[2], t["state"])


@pytest.mark.parametrize("doubled", [True, False], ids=["refresh-step", "reuse-step"])
def test_in_kernel_noise_and_0d_forms(doubled):
    t = inputs(seed=2)
    args = dict(w=torch.tensor(2.0), steps=torch.tensor(0), noise=False)
    got, want = run("triton", t, doubled, 1.0, **args), run("torch", t, doubled, 1.0, **args)
    assert rel_err(got[0], want[0]) <= 1e-5  # Philox's normals agree to 1e-5 (rng.py)


def test_a_refresh_step_equals_plain_cfg():
    t = inputs(seed=3)
    refresh = run("triton", t, True, 1.0)
    plain = guided_step(t["eps2"], t["z"], W, TABLE, STEPS, clip=1.0,
                        state=RowState(x_hat=t["x_prev"].clone()), noise=t["noise"],
                        impl="triton")
    assert torch.equal(refresh[0], plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage_rounds_once(dtype):
    t = inputs(seed=4, dtype=dtype)
    got = run("triton", t, False, 1.0)[0]
    truth = run("torch", {k: v.float() for k, v in t.items()}, False, 1.0)[0]
    assert got.dtype == dtype
    assert rel_err(got, truth) <= 2 * rel_err(truth.to(dtype), truth)


def test_delta_is_per_row_under_chunking():
    """A refresh step then a reuse step, on the whole batch and on chunks of 1 and 3 rows
    (views of one Δ buffer): the same z' and Δ (bitwise under the interpreter)."""
    whole, parts = torch.zeros(B, *SHAPE), torch.zeros(B, *SHAPE)
    for seed, doubled in ((6, True), (7, False)):
        t = inputs(seed=seed)
        eps2 = t["eps2"] if doubled else t["eps2"][:B]
        full = guided_step(eps2, t["z"], W, TABLE, STEPS, rule=RULE,
                           state=RowState(delta=whole, x_hat=t["x_prev"].clone()),
                           noise=CounterNoise(3), impl="triton")
        for rows in (slice(0, 1), slice(1, 4)):
            chunk = torch.cat([eps2[:B][rows], eps2[B:][rows]]) if doubled else eps2[rows]
            part = guided_step(chunk, t["z"][rows], W[rows], TABLE, STEPS[rows], rule=RULE,
                               state=RowState(delta=parts[rows],
                                              x_hat=t["x_prev"][rows].clone()),
                               noise=CounterNoise(3, torch.arange(B)[rows]), impl="triton")
            tol = 0.0 if launch.INTERPRETED else 1e-6
            assert rel_err(part, full[rows]) <= tol
            assert rel_err(parts[rows], whole[rows]) <= tol


def test_refresh_without_a_delta_buffer_is_refused():
    t = inputs(seed=8)
    with pytest.raises(ValueError, match="needs state=RowState") as err:
        guided_step(t["eps2"][:B], t["z"], W, TABLE, STEPS, rule=RULE, impl="triton")
    assert "\n" not in str(err.value)
