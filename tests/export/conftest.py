"""Session-scoped export fixtures: one randomly initialised tiny UNet (fixed seed), traced once,
exported once per format into a session tmp dir (compiling is the expensive part)."""
from __future__ import annotations

import pytest
import torch

from cfgengine.export.program import trace
from cfgengine.unet import UNet, preset

MAX_BATCH = 16


@pytest.fixture(scope="session")
def tiny_unet() -> UNet:
    """tiny preset with every layer re-drawn: the zero-initialised residual branches and output
    conv of a fresh UNet would make every output 0 and every parity test vacuous."""
    torch.manual_seed(0)
    net = UNet(preset("tiny"))
    for module in net.modules():
        if module is not net and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def traced(tiny_unet):
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


@pytest.fixture
def rel_err():
    """‖out − ref‖ / ‖ref‖ in float64."""
    def measure(out: torch.Tensor, ref: torch.Tensor) -> float:
        ref = ref.double()
        return float((out.double() - ref).norm() / ref.norm())
    return measure


@pytest.fixture
def sample_tolerance() -> float:
    """‖Δ‖/‖ref‖ bound for a whole 8-step sample: x̂ = (z − σ·ε̃)/α divides by α ≈ 5e-5 at λmin and
    w up to 4 scales ε̃, so per-call rounding of ~1e-7 grows to ~1e-4 in x̂ before the clip."""
    return 1e-3
