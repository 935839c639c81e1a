"""Helpers of the serve tests: a model wrapper that records every network call, and the offline
reference of a request."""
from __future__ import annotations

import io
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
