"""The serving app as a Ray Serve deployment (the `ray` extra): a local two-CPU Ray instance on
loopback, two replicas, the same samples as offline sampling, and one replica's death survived.
Skips where `ray[serve]` does not import."""
from __future__ import annotations

import socket
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from cfgengine.serve.ray_serve import app_builder  # noqa: E402
from tests.serve_support import npy, offline  # noqa: E402

REQUESTS = [dict(labels=[0, 4], w=[0.3, 0], steps=6, sampler="ddim", seed=3),
            dict(labels=[1, 2, 3], w=1.0, steps=5, sampler="ancestral", seed=8),
            dict(labels=[2], w=0.0, steps=4, sampler="ddim", eta=0.5, seed=1)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url():
    """Two replicas of the app on a local Ray instance; the proxy's base URL."""
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder({"ckpt": "gmm", "max_rows": "32", "num_replicas": "2",
                               "max_body_bytes": "4096"}), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_names() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA") and "cfgengine" in a["name"])


def check_parity(url: str) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        for body in REQUESTS:
            response = client.post("/v1/samples", json=body)
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(npy(response.content), offline_of(body), atol=1e-4)


def offline_of(body: dict) -> np.ndarray:
    import cfgengine

    return offline(cfgengine.load("gmm"), body)


def test_two_replicas_serve_the_offline_samples(ray_url):
    assert len(replica_names()) == 2
    check_parity(ray_url)
    bad = httpx.post(f"{ray_url}/v1/samples", json={"labels": [9]}, timeout=60)
    assert bad.status_code == 422 and "outside" in bad.json()["error"]
    big = httpx.post(f"{ray_url}/v1/samples", json={"labels": [1] * 5000}, timeout=60)
    assert big.status_code == 413  # the replica's own limits hold behind Ray's proxy
    with pytest.raises(ValueError, match="unknown argument 'max_row'"):
        app_builder({"max_row": "3"})


def test_one_replica_dies_and_the_service_goes_on(ray_url):
    before = replica_names()
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    check_parity(ray_url)  # the surviving replica answers at once
    deadline = time.monotonic() + 60
    while not (len(replica_names()) == 2 and replica_names() != before):
        assert time.monotonic() < deadline, "the dead replica was not replaced"
        time.sleep(0.5)
    check_parity(ray_url)
