"""`cfgengine serve` against hostile or careless clients (issue 24, items 10–17): numbers that
overflow float32 or float64, bodies too large or too slow, a missing API key, formats the model
can only just take, and /metrics counting every answer."""
from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from cfgengine import toy  # noqa: E402
from cfgengine.figures import to_uint8_images  # noqa: E402
from cfgengine.serve import create_app  # noqa: E402
from cfgengine.serve.app import serve_in_thread as live_server  # noqa: E402
from cfgengine.serve.batch import Engine, TableBank  # noqa: E402
from cfgengine.serve.schema import Combo, SampleRequest  # noqa: E402
from tests.serve_support import offline  # noqa: E402

HUGE = "1" + "0" * 400  # a JSON integer beyond float64
OVERFLOWING = [  # (body, the field the one-line error names)
    ('{"labels": [1], "w": 1e39}', "w"),  # finite in float64, inf in float32
    ('{"labels": [1], "w": [1e39]}', "w"),
    ('{"labels": [1], "w": -3.5e38}', "w"),
    (f'{{"labels": [1], "w": {HUGE}}}', "w"),
    (f'{{"labels": [1], "v": {HUGE}}}', "v"),
    (f'{{"labels": [1], "eta": {HUGE}}}', "eta"),
    (f'{{"labels": [1], "deadline_s": {HUGE}}}', "deadline_s"),
    (f'{{"labels": [1], "guidance": {{"rule": "cfg", "interval": [-1, {HUGE}]}}}}', "interval"),
    (f'{{"labels": [1], "guidance": {{"rule": "apg", "eta": {HUGE}}}}}', "eta"),
    ('{"labels": [1], "guidance": {"rule": "cfg", "rescale": 1e39}}', "rescale")]


def client_for(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve")


@pytest.fixture(scope="module")
def rgb():
    return toy.image_mixture(num_classes=4, shape=(3, 4, 4))


def test_numbers_that_overflow_float32_or_float64_are_422_and_keep_alive_survives(rgb):
    """An image model (clip = 1) turned w = 1e39 into ±1 images with 200; 10**400 was a plain-text
    500 that also reset the client's next request on the same connection."""
    app = create_app(rgb, max_rows=8)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for body, field in OVERFLOWING:
            response = client.post("/v1/samples", content=body,
                                   headers={"content-type": "application/json"})
            assert response.status_code == 422, (body, response.text)
            error = response.json()["error"]
            assert field in error and "finite" in error and "\n" not in error, (body, error)
            assert client.get("/healthz").status_code == 200  # same connection, still usable
    for w in (1 + 2j, True, "0.3", np.complex64(1j)):  # Python callers too: nothing is dropped
        with pytest.raises(ValueError, match="w must be a finite number"):
            SampleRequest(labels=[1], w=w)
    app.state.service.shutdown()


def test_an_unexpected_error_is_a_one_line_json_500_and_counted(gmm, monkeypatch):
    from cfgengine.serve import app as app_module

    def broken(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(app_module, "encode", broken)
    app = create_app(gmm)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        response = client.post("/v1/samples", json={"labels": [1], "steps": 3})
        assert response.status_code == 500
        assert response.json() == {"error": "internal error: RuntimeError"}
        assert client.get("/healthz").status_code == 200  # the connection survived
        assert 'cfgengine_requests_total{code="500"} 1' in client.get("/metrics").text
    app.state.service.shutdown()


def test_png_of_an_rgb_model_is_its_samples_in_one_row(rgb):
    from PIL import Image

    body = dict(labels=[0, 3], w=0.3, steps=4, seed=4, format="png")

    async def run(app):
        async with client_for(app) as client:
            return await client.post("/v1/samples", json=body)
    app = create_app(rgb)
    response = asyncio.run(run(app))
    app.state.service.shutdown()
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "RGB" and image.size == (2 * 5 + 1, 4 + 2)
    grid = np.asarray(image)
    expected = to_uint8_images(torch.from_numpy(offline(rgb, body)))
    np.testing.assert_array_equal(grid[1:5, 1:5], expected[0])
    np.testing.assert_array_equal(grid[1:5, 6:10], expected[1])
    two_channels = create_app(toy.image_mixture(num_classes=4, shape=(2, 4, 4)))
    refused = asyncio.run(run(two_channels))
    two_channels.state.service.shutdown()
    assert refused.status_code == 422 and "1, 3 or 4 channels" in refused.json()["error"]


def test_the_table_cache_keeps_the_most_recently_used_tables_only(gmm):
    bank = TableBank(Engine(gmm), max_tables=8)
    combos = [Combo(steps, "ddim", 0.3, 0.0, "cosine") for steps in range(2, 302)]
    first = bank.get(combos[0], None)
    for combo in combos[1:]:
        bank.get(combo, None)
        bank.get(combos[0], None)  # used all along: never the one dropped
    assert len(bank) == 8 and bank.get(combos[0], None) is first
    rebuilt = bank.get(combos[1], None)  # dropped long ago: built again, equal
    assert torch.equal(rebuilt.table, TableBank(Engine(gmm)).get(combos[1], None).table)


def test_metrics_count_every_answer_by_status(gmm):
    app = create_app(gmm, max_queue=0, max_body_bytes=100, api_key="k")
    key = {"Authorization": "Bearer k"}

    async def run():
        async with client_for(app) as client:
            await client.post("/v1/samples", json={"labels": [99]}, headers=key)  # 422
            await client.post("/v1/samples", json={"labels": [1]}, headers=key)  # 429
            await client.post("/v1/samples", json={"labels": [1]})  # 401
            await client.post("/v1/samples", json={"labels": [1] * 100}, headers=key)  # 413
            await client.get("/nowhere", headers=key)  # 404
            await client.get("/healthz")
            return (await client.get("/metrics", headers=key)).text
    text = asyncio.run(run())
    app.state.service.shutdown()
    for code in (401, 404, 413, 422, 429):
        assert f'cfgengine_requests_total{{code="{code}"}} 1' in text, text
    assert 'code="200"' not in text  # /healthz and /metrics are not counted
    assert "cfgengine_request_latency_seconds_count 4" in text  # the four POST /v1/samples


def raw_request(url: str, head: bytes, body_chunks=(), pause: float = 0.0) -> bytes:
    """Send `head` then `body_chunks` over a fresh connection; the server's whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                time.sleep(pause)
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the end: what a limit should do
        answer = b""
        while data := sock.recv(65536):
            answer += data
        return answer


def test_bodies_over_the_limit_are_413_before_they_are_read(gmm):
    app = create_app(gmm, max_body_bytes=1000)
    with live_server(app) as url:
        start = time.monotonic()
        declared = raw_request(url, b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                    b"application/json\r\nContent-Length: 20000000\r\n\r\n")
        assert declared.startswith(b"HTTP/1.1 413") and b"--max-body-bytes" in declared
        assert time.monotonic() - start < 5  # answered without waiting for 20 MB
        chunk = b"400\r\n" + b" " * 1024 + b"\r\n"  # chunked, no Content-Length: counted
        streamed = raw_request(url, b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                    b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                               [chunk] * 20000)
        assert streamed.startswith(b"HTTP/1.1 413")
        small = httpx.post(f"{url}/v1/samples", json={"labels": [1], "steps": 3}, timeout=30)
        assert small.status_code == 200
    app.state.service.shutdown()


def test_an_api_key_is_required_on_every_path_but_healthz(gmm):
    app = create_app(gmm, api_key="s3cret")

    async def run():
        async with client_for(app) as client:
            body = {"labels": [1], "steps": 3}
            answers = [await client.post("/v1/samples", json=body),
                       await client.post("/v1/samples", json=body,
                                         headers={"Authorization": "Bearer s3cre"}),
                       await client.get("/metrics"), await client.get("/openapi.json")]
            allowed = [await client.post("/v1/samples", json=body,
                                         headers={"Authorization": "Bearer s3cret"}),
                       await client.post("/v1/samples", json=body,
                                         headers={"X-API-Key": "s3cret"}),
                       await client.get("/healthz")]
            return answers, allowed
    refused, allowed = asyncio.run(run())
    app.state.service.shutdown()
    for response in refused:
        assert response.status_code == 401 and "API key" in response.json()["error"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert [r.status_code for r in allowed] == [200, 200, 200]


def test_slow_clients_are_disconnected(gmm):
    app = create_app(gmm)
    with live_server(app, client_timeout_s=1.0) as url:
        start = time.monotonic()  # slowloris: a header byte every 0.2 s, never finishing
        answer = raw_request(url, b"GET /healthz HTTP/1.1\r\n", [b"X"] * 100, pause=0.2)
        assert answer == b"" and time.monotonic() - start < 10
        start = time.monotonic()  # a body that trickles in
        raw_request(url, b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
                    [b" "] * 99, pause=0.2)
        assert time.monotonic() - start < 10
        assert httpx.get(f"{url}/healthz").status_code == 200
    app.state.service.shutdown()


def test_docs_need_nothing_from_outside(gmm):
    app = create_app(gmm)

    async def run():
        async with client_for(app) as client:
            return (await client.get("/docs")).text, await client.get("/redoc")
    page, redoc = asyncio.run(run())
    app.state.service.shutdown()
    assert "/v1/samples" in page and "/openapi.json" in page
    assert "<script" not in page and "<link" not in page and "http" not in page
    assert redoc.status_code == 404


def serve_process(tmp_path, *flags):
    """A `cfgengine serve --ckpt gmm --port 0` process; (process, its URL, stderr so far)."""
    log, err = tmp_path / "out.log", tmp_path / "err.log"
    command = [sys.executable, "-c", "from cfgengine.cli import main; raise SystemExit(main())",
               "serve", "--ckpt", "gmm", "--port", "0", *flags]
    with open(log, "w") as out, open(err, "w") as errors:
        process = subprocess.Popen(command, stdout=out, stderr=errors,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 90
    while "http://" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.05)
    return process, log.read_text().split()[2], err.read_text()


def test_listening_beyond_loopback_without_a_key_warns_and_a_key_file_is_honoured(tmp_path):
    process, url, err = serve_process(tmp_path, "--host", "0.0.0.0")
    process.kill()
    process.wait()
    assert len(err.splitlines()) == 1 and "beyond loopback" in err and "API key" in err
    (tmp_path / "key").write_text("0123456789abcdef\n")
    process, url, err = serve_process(tmp_path, "--host", "0.0.0.0", "--api-key-file",
                                      str(tmp_path / "key"))
    try:
        assert err == ""
        url = url.replace("0.0.0.0", "127.0.0.1")
        body = {"labels": [1], "steps": 3}
        assert httpx.post(f"{url}/v1/samples", json=body, timeout=30).status_code == 401
        key = {"X-API-Key": "0123456789abcdef"}
        assert httpx.post(f"{url}/v1/samples", json=body, headers=key,
                          timeout=30).status_code == 200
    finally:
        process.kill()
        process.wait()


def test_help_names_the_backend_that_healthz_reports(capsys):
    import cfgengine
    from cfgengine.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    app = create_app(cfgengine.load("default"))

    async def run():
        async with client_for(app) as client:
            return (await client.get("/healthz")).json()["backend"]
    backend = asyncio.run(run())
    app.state.service.shutdown()
    assert "auto = torch" not in help_text
    assert f"{backend} on CPU" in help_text or f"else {backend}" in help_text, help_text


def test_bad_guard_flags_are_one_line_user_errors(tmp_path, capsys):
    from cfgengine.cli import main

    (tmp_path / "empty").write_text("\n")
    empty, missing = str(tmp_path / "empty"), str(tmp_path / "missing")
    bad = [["--max-body-bytes", "0"], ["--client-timeout", "nan"], ["--api-key", " "],
           ["--api-key-file", missing], ["--api-key-file", empty],
           ["--api-key", "k", "--api-key-file", empty]]
    for flags in bad:
        assert main(["serve", "--ckpt", "gmm", "--port", "0", *flags]) == 2, flags
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == len(bad) and all("Traceback" not in line for line in lines)
    for line, words in zip(lines, ("--max-body-bytes", "--client-timeout", "empty", "missing",
                                   "empty", "not both")):
        assert words in line, line
