"""Forward counts of the sampling loop: w = 0 and labels=None skip the null half (one B-row
forward per step), a guided step is ONE doubled forward of 2B rows (docs/design.md §4)."""
from __future__ import annotations

import pytest
import torch

from cfgengine.sampler import sample
from tests.test_sampler_api import (FP32_VS_FP64_TOL, LABELS, SAME_MATH_TOL, STEPS,
                                    reference_sample, rel_err, run)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_w_zero_shortcut_runs_b_rows_and_equals_doubled_run(gmm, recorder, sampler):
    plain = recorder(gmm)
    shortcut = run(plain, w=0.0, sampler=sampler)
    assert [rows for rows, _ in plain.calls] == [9] * STEPS
    assert all(torch.equal(seen, LABELS) for _, seen in plain.calls)
    guided = recorder(gmm)  # w ≠ 0 anywhere takes the doubled batch; 1e-30 changes no digit
    doubled = run(guided, w=1e-30, sampler=sampler)
    assert [rows for rows, _ in guided.calls] == [18] * STEPS
    assert rel_err(shortcut, doubled) < SAME_MATH_TOL


def test_w_zero_per_sample_tensor_also_takes_the_shortcut(gmm, recorder):
    plain = recorder(gmm)
    run(plain, w=torch.zeros(9))
    assert [rows for rows, _ in plain.calls] == [9] * STEPS


def test_guided_run_makes_one_doubled_forward_per_step(gmm, recorder):
    plain = recorder(gmm)
    run(plain, w=torch.tensor([0.0] * 8 + [0.5]))
    assert [rows for rows, _ in plain.calls] == [18] * STEPS
    for _, seen in plain.calls:
        assert torch.equal(seen, torch.cat([LABELS, torch.full((9,), 5)]))


@pytest.mark.parametrize("batch_size", [None, 4])
def test_unconditional_runs_one_b_row_null_forward_per_step(gmm, recorder, batch_size):
    plain = recorder(gmm)
    x = sample(plain, None, n=7, steps=STEPS, seed=3, batch_size=batch_size)
    assert x.shape == (7, 2)
    sizes = [7] if batch_size is None else [4, 3]
    assert [rows for rows, _ in plain.calls] == [s for s in sizes for _ in range(STEPS)]
    assert all(bool((seen == 5).all()) for _, seen in plain.calls)


def test_unconditional_equals_float64_reference_of_null_model(gmm):
    x = sample(gmm, None, n=7, w=2.0, steps=STEPS, seed=3)  # w is irrelevant without labels
    ref = reference_sample(gmm, torch.full((7,), 5), 0.0, steps=STEPS, seed=3)
    assert rel_err(x, ref) < FP32_VS_FP64_TOL
