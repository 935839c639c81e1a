"""`cfgengine serve` over real loopback HTTP: a full queue answers 429 with Retry-After, a
deadline answers 504, a client that goes away frees its rows, and SIGTERM drains a real
`cfgengine serve` process (503 for new requests, in-flight ones finish, exit 0)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from cfgengine.serve import create_app  # noqa: E402
from cfgengine.serve.app import serve_in_thread as live_server  # noqa: E402
from tests.serve_support import Recorder, npy, offline  # noqa: E402

LONG = dict(labels=[0], w=1.0, steps=1000, sampler="ddim")  # 2 rows, ~5 s at 5 ms a step


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def in_background(url: str, body: dict) -> dict:
    """POST `body` in a thread; the dict gets 'response' when it is answered."""
    box: dict = {}

    def post():
        box["response"] = httpx.post(f"{url}/v1/samples", json=body, timeout=60)
    box["thread"] = threading.Thread(target=post, daemon=True)
    box["thread"].start()
    return box


def test_full_queue_is_429_with_retry_after_and_deadlines_are_504(gmm):
    app = create_app(Recorder(gmm, delay=0.005), max_rows=2, max_queue=1)
    scheduler = app.state.service.ready()
    with live_server(app) as url:
        running = in_background(url, {**LONG, "deadline_s": 1.5})
        wait_for(lambda: scheduler.batch.rows == 1)
        queued = in_background(url, dict(labels=[1], w=0.3, steps=4, seed=2))
        wait_for(lambda: len(scheduler.queue) == 1)
        refused = httpx.post(f"{url}/v1/samples", json=dict(labels=[2], steps=4), timeout=30)
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1 and "queue is full" in refused.json()["error"]
        for box in (running, queued):
            box["thread"].join(timeout=30)
        assert running["response"].status_code == 504
        assert queued["response"].status_code == 200  # FIFO: it ran once the batch had room
        np.testing.assert_allclose(npy(queued["response"].content),
                                   offline(gmm, dict(labels=[1], w=0.3, steps=4, seed=2)),
                                   atol=1e-4)


def test_a_client_that_goes_away_frees_its_rows(gmm):
    app = create_app(Recorder(gmm, delay=0.005))
    scheduler = app.state.service.ready()
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({**LONG, "labels": [0, 1, 2]}).encode()
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: scheduler.batch.rows == 3)
        wait_for(lambda: scheduler.batch.rows == 0, timeout=5)  # long before its 1000 steps
        wait_for(lambda: scheduler.metrics.requests[499] == 1)  # counted as it is answered
        assert httpx.post(f"{url}/v1/samples", json=dict(labels=[1], steps=3)).status_code == 200


def test_sigterm_drains_a_real_server_process(gmm, tmp_path):
    log = tmp_path / "serve.log"
    command = [sys.executable, "-c", "from cfgengine.cli import main; raise SystemExit(main())",
               "serve", "--ckpt", "gmm", "--port", "0", "--max-rows", "512"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: "http://" in log.read_text(), timeout=90)
        url = log.read_text().split()[2]
        body = dict(labels=list(range(5)) * 40, w=0.3, steps=300, seed=7, sampler="ancestral")
        running = in_background(url, body)
        wait_for(lambda: "cfgengine_rows_in_flight 200" in httpx.get(f"{url}/metrics").text)
        process.send_signal(signal.SIGTERM)
        refused = httpx.post(f"{url}/v1/samples", json=dict(labels=[1], steps=3), timeout=30)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        assert process.wait(timeout=60) == 0
        running["thread"].join(timeout=10)
        assert running["response"].status_code == 200  # in flight: finished and sent
        x_hat = npy(running["response"].content)
        assert x_hat.shape == (200, 2)
        head = {**body, "labels": body["labels"][:5]}  # sample i depends only on its own key
        np.testing.assert_allclose(x_hat[:5], offline(gmm, head), atol=1e-4)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_load_generator_measures_both_modes_and_writes_its_record(tmp_path):
    from cfgengine.bench import serve as load_generator

    out = tmp_path / "serve.json"
    assert load_generator.main(["--ckpt", "gmm", "--requests", "4", "--rounds", "1",
                                "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["median"]) == {"one_by_one", "concurrent"}
    assert record["max_abs_diff_between_modes"] <= 1e-4  # the batch does not change samples
    assert record["environment"]["load_average"] is not None and record["speedup_per_round"]
    assert {r["sampler"] for r in record["requests"]} == {"ancestral", "ddim"}


def test_cli_user_errors_exit_2_in_one_line(capsys):
    from cfgengine.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        assert main(["serve", "--ckpt", "gmm", "--port", port]) == 2
    assert main(["serve", "--max-rows", "0"]) == 2
    assert main(["serve", "--ckpt", "no-such-model", "--port", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "cannot listen" in lines[0] and "--max-rows" in lines[1]
