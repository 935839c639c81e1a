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


@pytest.fixture(scope="module")
def private_onnx_cache(tmp_path_factory):
    """Graphs go to a private cache folder (never the user's ~/.cache), sessions to an empty
    in-memory cache, for the module that asks."""
    from cfgengine.backends import onnxruntime as ort_backend

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CFGENGINE_CACHE_DIR", str(tmp_path_factory.mktemp("cfgengine-cache")))
        patch.setattr(ort_backend, "_SESSIONS", ort_backend.OrderedDict())
        yield


# Session export fixtures: one randomly initialised tiny UNet (fixed seed), traced once, exported
# once per format (the export and runner tests share them: compiling is the expensive part).

MAX_BATCH = 16


@pytest.fixture(scope="session")
def tiny_unet():
    """tiny preset with every layer re-drawn: the zero-initialised residual branches and output
    conv of a fresh UNet would make every output 0 and every parity test vacuous."""
    from cfgengine.unet import UNet, preset

    torch.manual_seed(0)
    net = UNet(preset("tiny"))
    for module in net.modules():
        if module is not net and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def traced(tiny_unet):
    from cfgengine.export.program import trace

    return trace(tiny_unet, max_batch=MAX_BATCH, source="tiny-test")


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def onnx_path(traced, export_dir):
    from cfgengine.export import onnx as onnx_export

    return onnx_export.export_program(traced, export_dir / "tiny.onnx")


@pytest.fixture(scope="session")
def aoti_path(traced, export_dir):
    from cfgengine.export import aoti

    return aoti.export_program(traced, export_dir / "tiny.pt2")


def cli_fails(capsys, argv, *mentions) -> str:
    """Run `cfgengine argv` in-process: it must exit 2 with exactly one `cfgengine: error:` line
    naming every one of `mentions`; returns that line."""
    from cfgengine import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cfgengine: error: ") and err.count("\n") == 1, err
    for word in mentions:
        assert word in err, err
    return err
