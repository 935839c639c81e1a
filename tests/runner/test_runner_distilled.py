"""cfgengine-run on a guidance-distilled AOTInductor package (w as the net's fourth input, one
forward of B rows per step) against `cfgengine.sample` on the same package."""
from __future__ import annotations

import pytest
import torch

from tests.runner.test_runner import check_parity
from tests.tiny_distilled import tiny_distilled


@pytest.fixture(scope="module")
def distilled_package(tmp_path_factory):
    from cfgengine.export import aoti
    from cfgengine.export.program import trace

    traced = trace(tiny_distilled(), max_batch=4,
                   source="tiny-distilled")
    return aoti.export_program(traced, tmp_path_factory.mktemp("distilled") / "student.pt2")


@pytest.mark.parametrize("sampler, settings", [("ancestral", {"w": 1.5}), ("ddim", {"w": 0.0}),
                                               ("ddim", {"w": 4.0, "eta": 0.5})])
def test_distilled_samples_match_python(runner_binary, distilled_package, tmp_path, sampler,
                                        settings):
    from cfgengine.export import aoti

    backend = aoti.load(distilled_package)
    assert backend.info.guidance_embedded
    x = check_parity(runner_binary, backend, distilled_package, tmp_path, [0, 2, 1, 1, 2, 0],
                     sampler=sampler, steps=4, **settings)
    assert torch.isfinite(torch.from_numpy(x)).all()
