"""Shared test setup: Triton runs under its interpreter when there is no GPU (docs/design.md §2), set
before any kernel import; small toy models for the sampler tests."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cfgengine  # noqa: E402
from cfgengine import toy  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def trust_file(tmp_path_factory):
    """Every test records and reads trusted exports in a session tmp file, never the user's
    ~/.config/cfgengine/trusted.json (cfgengine.trust)."""
    path = tmp_path_factory.mktemp("trust") / "trusted.json"
    os.environ["CFGENGINE_TRUST_FILE"] = str(path)
    return path


@pytest.fixture(scope="session")
def gmm():
    """The built-in 2-D ring mixture (K = 5, sample_shape (2,), no clipping)."""
    return cfgengine.load("gmm")


@pytest.fixture(scope="session")
def linear_gaussian():
    """A tiny 3-class linear-Gaussian Denoiser on [2, 3] samples: ε is affine in z."""
    gen = torch.Generator().manual_seed(1234)
    means = torch.rand((3, 2, 3), generator=gen) - 0.5
    stds = 0.2 + 0.3 * torch.rand((3, 2, 3), generator=gen)
    return toy.linear_gaussian(means, stds, torch.zeros(2, 3), torch.full((2, 3), 0.6))


class CallRecorder:
    """Wraps a Denoiser, recording (rows, labels) of every call; forwards its attributes."""

    def __init__(self, denoiser):
        self.inner = denoiser
        self.num_classes = denoiser.num_classes
        self.sample_shape = tuple(denoiser.sample_shape)
        self.clip = getattr(denoiser, "clip", None)
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, z, logsnr, labels):
        self.calls.append((z.shape[0], labels.clone()))
        return self.inner(z, logsnr, labels)


@pytest.fixture
def recorder():
    """Factory: `recorder(model)` gives a fresh CallRecorder around `model`."""
    return CallRecorder
