"""Export test helpers; the session export fixtures (tiny_unet, traced, onnx_path, aoti_path)
live in tests/conftest.py, shared with the C++ runner's tests (compiling is the expensive part)."""
from __future__ import annotations

import pytest
import torch


from tests.conftest import MAX_BATCH  # noqa: F401  (tests import it from here)


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
