"""Helpers of the serve tests: a model wrapper that records every network call, a live uvicorn
server on a free loopback port in a thread, and the offline reference of a request."""
from __future__ import annotations

import contextlib
import io
import socket
import threading
import time

import numpy as np
import torch

import cfgengine


class Recorder:
    """A Denoiser that forwards to `model` and records each call's (rows, null rows); `delay`
    seconds per call make requests overlap deterministically enough on a busy CPU."""

    def __init__(self, model, delay: float = 0.0):
        self.model, self.delay = model, delay
        self.num_classes, self.sample_shape = model.num_classes, model.sample_shape
        self.clip = getattr(model, "clip", None)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, z, logsnr, labels):
        self.calls.append((z.shape[0], int((labels == self.num_classes).sum())))
        if self.delay:
            time.sleep(self.delay)
        return self.model(z, logsnr, labels)


def offline(model, request: dict) -> np.ndarray:
    """`cfgengine.sample` for the same request (the serving contract)."""
    keywords = {k: v for k, v in request.items() if k in ("w", "steps", "sampler", "v", "eta",
                                                          "seed")}
    return cfgengine.sample(model, torch.tensor(request["labels"]), **keywords).numpy()


def npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content))


@contextlib.contextmanager
def live_server(app):
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
