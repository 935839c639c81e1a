"""`cfgengine serve` in process (ASGI client): per-request parity with offline sampling while
requests with mixed settings share the running batch, the batch's layout (one network call per
step, null rows only for guided rows), and 4xx answers to bad requests."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from cfgengine import toy  # noqa: E402
from cfgengine.serve import create_app  # noqa: E402
from tests.serve_support import Recorder, npy, offline  # noqa: E402

MIXED = [dict(labels=[0, 1, 2], w=[0.0, 0.3, 4.0], steps=12, sampler="ancestral", seed=3),
         dict(labels=[3], w=1.0, steps=7, sampler="ddim", eta=0.5, seed=3),
         dict(labels=[1, 1], w=0, steps=20, sampler="ddim", seed=9),
         dict(labels=[2, 0], w=0.3, steps=5, sampler="ancestral", v=0.0, seed=1),
         dict(labels=[1], w=4.0, steps=9, sampler="ddim", seed=3)]


async def post_staggered(app, requests, gap: float = 0.02):
    """POST each request `gap` seconds after the previous one (later ones join a running batch)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
        async def one(i, body):
            await asyncio.sleep(i * gap)
            return await client.post("/v1/samples", json=body)
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))


@pytest.fixture(scope="module")
def images():
    return toy.image_mixture(num_classes=4, shape=(1, 4, 4))


@pytest.mark.parametrize("name", ["gmm", "images"])
def test_each_request_equals_offline_sampling_whatever_shares_its_batch(name, gmm, images):
    model = {"gmm": gmm, "images": images}[name]
    recorder = Recorder(model, delay=0.002)
    app = create_app(recorder, max_rows=32)
    responses = asyncio.run(post_staggered(app, MIXED))
    for response, request in zip(responses, MIXED):
        assert response.status_code == 200, response.text
        got = npy(response.content)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, offline(model, request), atol=1e-4, rtol=0)
    conditional = [rows - null for rows, null in recorder.calls]
    assert max(conditional) > 3  # > the largest request's rows: requests shared network calls


def test_default_unet_parity_in_a_shared_batch():
    import cfgengine

    model = cfgengine.load("default")
    requests = [dict(labels=[0, 5], w=[0.3, 0], steps=4, sampler="ancestral", seed=2),
                dict(labels=[7], w=4.0, steps=3, sampler="ddim", seed=8)]
    responses = asyncio.run(post_staggered(create_app(model), requests, gap=0.0))
    for response, request in zip(responses, requests):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(npy(response.content), offline(model, request), atol=1e-4)


def test_one_network_call_per_step_with_null_rows_only_for_guided_rows(gmm):
    from cfgengine.serve.batch import Engine, RunningBatch
    from cfgengine.serve.schema import Limits, SampleRequest, check_request

    recorder = Recorder(gmm)
    batch = RunningBatch(Engine(recorder))  # driven here, without the scheduler's thread
    limits = Limits(gmm.num_classes, max_rows=64)
    a = dict(labels=[0, 1], w=[0.0, 2.0], steps=6, sampler="ddim", seed=1)
    b = dict(labels=[2, 3, 4], w=0.0, steps=6, sampler="ancestral", seed=5)
    jobs = [check_request(SampleRequest(**body), limits) for body in (a, b)]
    batch.compose([batch.admit(job) for job in jobs])
    finished = []
    while batch.members:
        done = batch.step()
        finished += [(m.job, batch.rows_of(m).clone()) for m in done]
        batch.compose([m for m in batch.members if not m.done])
    assert recorder.calls == [(5 + 1, 1)] * 6  # 5 conditional rows + 1 null row (w = 2 only)
    for (job, x_hat), body in zip(sorted(finished, key=lambda f: f[0].seed), (a, b)):
        np.testing.assert_allclose(x_hat.numpy(), offline(gmm, body), atol=1e-4)
    assert [job.cost for job in jobs] == [3, 3]  # guided rows count twice, w = 0 rows once


BAD = [('{"labels": [5]}', 422, "outside [0, 5)"),
       ('{"labels": [-1]}', 422, "outside"),
       ('{"labels": []}', 422, "empty"),
       ('{"labels": [1.5]}', 422, "integer"),
       ('{"labels": [1], "w": "0.3"}', 422, "finite number"),
       ('{"labels": [1], "w": NaN}', 422, "finite number"),
       ('{"labels": [1], "w": 1e999}', 422, "finite number"),
       ('{"labels": [1, 2], "w": [1]}', 422, "1 values for 2 labels"),
       ('{"labels": [1], "steps": 0}', 422, "steps"),
       ('{"labels": [1], "steps": 1000000}', 422, "steps"),
       ('{"labels": [1], "steps": true}', 422, "integer"),
       ('{"labels": [1], "sampler": "euler"}', 422, "sampler must be one of"),
       ('{"labels": [1], "grid": "zigzag"}', 422, "grid must be one of"),
       ('{"labels": [1], "v": 2}', 422, "v must be"),
       ('{"labels": [1], "seed": -1}', 422, "seed"),
       ('{"labels": [1], "format": "gif"}', 422, "format"),
       ('{"labels": [1], "format": "png"}', 422, "image model"),
       ('{"labels": [1], "colour": 1}', 422, "colour"),
       ('{"labels": [1], "guidance": {"rule": "magic"}}', 422, "guidance rule"),
       ('{"labels": [0, 0, 0, 0, 0, 0, 0, 0, 0], "w": 1}', 422, "--max-rows"),
       ('{"labels": [1], ', 400, "not valid JSON"),
       ('[1, 2]', 422, "")]


def test_bad_requests_get_one_line_4xx_and_the_server_keeps_serving(gmm):
    app = create_app(gmm, max_rows=16)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            for body, status, words in BAD:
                response = await client.post("/v1/samples", content=body,
                                             headers={"content-type": "application/json"})
                assert response.status_code == status, (body, response.text)
                error = response.json()["error"]
                assert words in error and "\n" not in error, (body, error)
            good = await client.post("/v1/samples", json={"labels": [1], "steps": 3})
            assert good.status_code == 200
            assert (await client.get("/healthz")).json()["status"] == "ok"
            metrics = (await client.get("/metrics")).text
            assert 'cfgengine_requests_total{code="200"} 1' in metrics
            assert (await client.get("/docs")).status_code == 200
            assert "/v1/samples" in (await client.get("/openapi.json")).json()["paths"]
    asyncio.run(run())
    app.state.service.shutdown()


def test_npz_and_png_formats(images):
    app = create_app(images)
    body = dict(labels=[0, 3], w=0.3, steps=4, seed=4)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            npz = await client.post("/v1/samples", json={**body, "format": "npz"})
            png = await client.post("/v1/samples", json={**body, "format": "png"})
            return npz, png
    npz, png = asyncio.run(run())
    import io

    from PIL import Image

    from cfgengine.figures import to_uint8_images
    import torch

    arrays = np.load(io.BytesIO(npz.content))
    expected = to_uint8_images(torch.from_numpy(offline(images, body)))
    np.testing.assert_array_equal(arrays["arr_0"], expected)
    np.testing.assert_array_equal(arrays["labels"], [0, 3])
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (2 * 5 + 1, 4 + 2)
    app.state.service.shutdown()


class Shrink:
    """A minimal Denoiser, ε = 0.1·z + 0.01·label, free of host syncs itself."""

    num_classes, sample_shape, clip = 3, (2, 2), 1.0

    def __call__(self, z, logsnr, labels):
        return 0.1 * z + 0.01 * labels.to(z.dtype).reshape(-1, 1, 1)


def _batch_of(model, bodies):
    from cfgengine.serve.batch import Engine, RunningBatch
    from cfgengine.serve.schema import Limits, SampleRequest, check_request

    batch = RunningBatch(Engine(model))
    limits = Limits(model.num_classes, max_rows=64)
    batch.compose([batch.admit(check_request(SampleRequest(**b), limits)) for b in bodies])
    return batch


def test_steps_between_layout_changes_make_no_host_sync(monkeypatch):
    import torch

    bodies = [dict(labels=[0, 1], w=[0.0, 2.0], steps=9, sampler="ancestral", seed=1),
              dict(labels=[2], w=0.3, steps=9, sampler="ddim", eta=0.5, seed=2)]
    batch = _batch_of(Shrink(), bodies)
    batch.step()  # builds the runs of the steady state (host lists only)

    def sync(*args, **kwargs):
        raise AssertionError("host sync inside the step")
    for name in ("item", "__bool__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for _ in range(6):  # steps 1..6: same layout, noisy, guided
        assert batch.step() == []
    monkeypatch.undo()
    for _ in range(2):
        done = batch.step()
    assert len(done) == 2
    for member, body in zip(sorted(done, key=lambda m: m.job.seed), bodies):
        np.testing.assert_allclose(batch.rows_of(member).numpy(), offline(Shrink(), body),
                                   atol=1e-5)


def test_rows_outside_their_guidance_interval_cost_one_row(monkeypatch):
    from cfgengine import CFG

    batch = _batch_of(Shrink(), [dict(labels=[0, 1], w=1.0, steps=6, seed=1)])
    member = batch.members[0]
    lam = member.tables.plan.logsnr.tolist()
    member.job.rule = CFG(interval=(lam[2], lam[3]))  # guided at t = 2, 3 only
    member.tables = batch.bank.get(member.job.combo, member.job.rule)
    counts = []
    for t in range(6):
        member.t = t
        runs, null_rows, _ = batch._runs()
        counts.append(len(null_rows))
        assert [run.guided for run in runs] == [2 <= t <= 3]
    assert counts == [0, 0, 2, 2, 0, 0]


def _rule(spec):
    from cfgengine.serve.schema import RULES

    if spec is None:
        return None
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "rule"}
    return RULES[spec["rule"]](**params)


ROUND_2 = [dict(labels=[0, 1], w=[0.3, 2.0], steps=10, sampler="dpmpp_2m", seed=1),
           dict(labels=[2], w=1.0, steps=8, grid="karras", seed=1),
           dict(labels=[3, 0], w=4.0, steps=9, sampler="ddim", grid="uniform", seed=2,
                guidance={"rule": "cfg", "rescale": 0.7}),
           dict(labels=[1], w=1.0, steps=12, sampler="dpmpp_2m", grid="cosine-authors", seed=3,
                guidance={"rule": "zero_star"}),
           dict(labels=[2, 2], w=[0, 3.0], steps=11, sampler="ddim", seed=3,
                guidance={"rule": "apg", "eta": 0.2, "momentum": -0.5, "norm_threshold": 2.0}),
           dict(labels=[0, 3], w=2.0, steps=10, seed=4,
                guidance={"rule": "cfg", "interval": [-1.0, 3.0]})]


def _round_2_installed() -> bool:
    from cfgengine.serve.schema import GRIDS, RULES
    from cfgengine.tables import SAMPLERS

    return "dpmpp_2m" in SAMPLERS and "karras" in GRIDS and {"cfg", "zero_star", "apg"} <= set(RULES)


@pytest.mark.skipif(not _round_2_installed(), reason="this cfgengine has no DPM-Solver++(2M), "
                                                     "grids or guidance rules yet")
def test_dpmpp_grids_and_guidance_rules_share_a_batch_and_equal_offline(images):
    import cfgengine
    import torch

    responses = asyncio.run(post_staggered(create_app(images, max_rows=32), ROUND_2, gap=0.01))
    for response, body in zip(responses, ROUND_2):
        assert response.status_code == 200, response.text
        keywords = {k: body[k] for k in ("w", "steps", "sampler", "grid", "seed") if k in body}
        expected = cfgengine.sample(images, torch.tensor(body["labels"]),
                                    guidance=_rule(body.get("guidance")), **keywords)
        np.testing.assert_allclose(npy(response.content), expected.numpy(), atol=1e-4)
