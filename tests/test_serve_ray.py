"""The serving app as a Ray Serve deployment; runs only where `ray` imports (CI does not install
it), on a local one-CPU Ray instance, loopback only."""
from __future__ import annotations

import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from cfgengine.serve.ray_serve import app_builder  # noqa: E402
from tests.serve_support import npy, offline  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_serve_deployment_serves_the_same_samples(gmm):
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder({"ckpt": "gmm", "max_rows": "32"}), route_prefix="/")
        body = dict(labels=[0, 4], w=[0.3, 0], steps=6, sampler="ddim", seed=3)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/samples", json=body, timeout=120)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(npy(response.content), offline(gmm, body), atol=1e-4)
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/samples", json={"labels": [9]}, timeout=60)
        assert bad.status_code == 422 and "outside" in bad.json()["error"]
    finally:
        serve.shutdown()
        ray.shutdown()
