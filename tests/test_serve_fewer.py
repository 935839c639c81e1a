"""Serving with fewer network rows: CFG(refresh=k) requests (null rows on their refresh steps only,
Δ kept per row across the running batch's layouts) and a guidance-distilled model (one row per
sample, w per row, a row counts once against --max-rows), each equal to offline sampling."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import cfgengine  # noqa: E402
from cfgengine import CFG, guided_eps  # noqa: E402
from cfgengine.serve import create_app  # noqa: E402
from tests.serve_support import Recorder, npy  # noqa: E402
from tests.test_serve import post_staggered  # noqa: E402

REFRESH = [dict(labels=[0, 1, 2], w=[0.0, 0.3, 4.0], steps=12, seed=3,
                guidance={"rule": "cfg", "refresh": 2}),
           dict(labels=[3], w=1.0, steps=7, sampler="ddim", seed=3,
                guidance={"rule": "cfg", "refresh": 3, "interval": [-4.0, 4.0]}),
           dict(labels=[1, 1], w=2.0, steps=9, sampler="dpmpp_2m", seed=9),
           dict(labels=[2, 0], w=0.3, steps=10, seed=1, guidance={"rule": "cfg", "refresh": 4})]


def _offline(model, body) -> np.ndarray:
    keywords = {k: body[k] for k in ("w", "steps", "sampler", "seed") if k in body}
    spec = dict(body.get("guidance", {"rule": "cfg"}))
    spec.pop("rule")
    if "interval" in spec:
        spec["interval"] = tuple(spec["interval"])
    return cfgengine.sample(model, torch.tensor(body["labels"]), guidance=CFG(**spec),
                            **keywords).numpy()


def test_refresh_requests_share_a_batch_and_equal_offline(gmm):
    recorder = Recorder(gmm, delay=0.002)
    responses = asyncio.run(post_staggered(create_app(recorder, max_rows=32), REFRESH, gap=0.01))
    for response, body in zip(responses, REFRESH):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(npy(response.content), _offline(gmm, body), atol=1e-4)


def test_a_refresh_request_runs_null_rows_on_its_refresh_steps_only(gmm):
    recorder = Recorder(gmm)
    response, = asyncio.run(post_staggered(create_app(recorder, max_rows=32), REFRESH[:1]))
    assert response.status_code == 200, response.text
    # rows 1 and 2 have w ≠ 0: two null rows on t = 0, 2, 4, …; none between
    assert recorder.calls == [(5, 2) if t % 2 == 0 else (3, 0) for t in range(12)]


class Distilled:
    """A guidance-embedded Denoiser answering the exact ε̃_w of `model` (eq. 6), as a perfectly
    distilled student would; records each call's rows and w."""

    guidance_embedded = True

    def __init__(self, model):
        self.model = model
        self.num_classes, self.sample_shape = model.num_classes, model.sample_shape
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, z, logsnr, labels, w):
        self.calls.append((z.shape[0], w.clone()))
        time.sleep(0.002)  # a step takes time, so the staggered second request joins the first
        null = torch.full_like(labels, self.num_classes)
        return guided_eps(self.model(z, logsnr, labels), self.model(z, logsnr, null), w)


DISTILLED = [dict(labels=[0, 1, 2], w=[0.0, 0.3, 4.0], steps=12, seed=3),
             dict(labels=[3, 4], w=1.0, steps=7, sampler="ddim", seed=3,
                  guidance={"rule": "cfg", "interval": [-4.0, 4.0]})]


def test_a_distilled_model_serves_one_row_per_sample_and_equals_offline(gmm):
    student = Distilled(gmm)
    responses = asyncio.run(post_staggered(create_app(student, max_rows=5), DISTILLED))
    for response, body in zip(responses, DISTILLED):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(npy(response.content), _offline(student, body), atol=1e-4)
        np.testing.assert_allclose(npy(response.content), _offline(gmm, body), atol=1e-4)
    assert max(rows for rows, _ in student.calls) == 5  # both requests, one row each
    zeros = {int((w == 0).sum()) for rows, w in student.calls if rows == 5}
    assert zeros == {1, 3}  # the w = 0 row, and the second request's rows outside its interval


@pytest.mark.parametrize("embedded, status", [(True, 200), (False, 422)])
def test_a_distilled_row_counts_once_against_max_rows(gmm, embedded, status):
    model = Distilled(gmm) if embedded else gmm
    body = dict(labels=[0, 1, 2, 3], w=1.0, steps=3, seed=0)
    response, = asyncio.run(post_staggered(create_app(model, max_rows=4), [body]))
    assert response.status_code == status, response.text


@pytest.mark.parametrize("guidance", [{"rule": "cfg", "refresh": 2}, {"rule": "zero_star"},
                                      {"rule": "cfg", "rescale": 0.5}])
def test_a_distilled_model_refuses_rules_that_need_both_branches(gmm, guidance):
    body = dict(labels=[0], w=1.0, steps=3, seed=0, guidance=guidance)
    response, = asyncio.run(post_staggered(create_app(Distilled(gmm), max_rows=4), [body]))
    assert response.status_code == 422 and "only answers" in response.text
