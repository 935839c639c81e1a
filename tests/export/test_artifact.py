"""Every exported backend (ONNX Runtime, AOTInductor) against the torch model, the reference: the
same doubled-batch eps2 at batch sizes other than the export example, rows in = rows out against
the plain net, same full samples (with a guidance interval: 2B-row and B-row steps)."""
from __future__ import annotations

import pytest
import torch

import cfgengine
from cfgengine import export
from cfgengine.export import metadata
from cfgengine.export.program import EXAMPLE_BATCH, example_inputs
from cfgengine.guidance import GuidedDenoiser
from cfgengine.schedule import logsnr_grid

from tests.export.conftest import MAX_BATCH


@pytest.fixture(scope="module", params=["onnx", "aoti"])
def backend(request):
    if request.param == "onnx":
        pytest.importorskip("onnxruntime")
    return export.load(request.getfixturevalue(f"{request.param}_path"))


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_matches_torch_at_batch_sizes_other_than_the_example(backend, tiny_unet, traced, batch,
                                                             rel_err):
    assert batch != EXAMPLE_BATCH
    inputs = example_inputs(traced.meta, batch, seed=batch)
    ref = GuidedDenoiser(tiny_unet)(*inputs)  # (2B, C, H, W)
    out = GuidedDenoiser(backend)(*inputs)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-4


def test_null_half_is_a_forward_with_the_null_label(backend, tiny_unet, traced, rel_err):
    z, logsnr, labels = example_inputs(traced.meta, 5, seed=11)
    null = torch.full_like(labels, tiny_unet.num_classes)
    eps2 = GuidedDenoiser(backend)(z, logsnr, labels)  # (10, C, H, W): one run of 10 rows
    assert rel_err(eps2[5:], tiny_unet(z, logsnr, null)) <= 1e-4
    assert rel_err(eps2[:5], tiny_unet(z, logsnr, labels)) <= 1e-4


def test_carries_the_model_metadata(backend, tiny_unet):
    facts = backend.info
    assert facts.exported and facts.backend == backend.backend_name
    assert (facts.num_classes, facts.sample_shape, facts.clip) == \
        (tiny_unet.num_classes, tuple(tiny_unet.sample_shape), tiny_unet.clip)
    assert backend.meta.source_sha256 == metadata.weights_sha256(tiny_unet)
    assert backend.meta.program == metadata.PROGRAM and backend.meta.precision == "fp32"
    assert facts.precision == "fp32"
    assert facts.logsnr_range == backend.meta.logsnr_range == (-20.0, 20.0)


@pytest.mark.parametrize("batch", [1, 5, 2 * MAX_BATCH])
def test_rows_in_rows_out_is_the_plain_net(backend, tiny_unet, traced, batch, rel_err):
    z, logsnr, labels = example_inputs(traced.meta, batch, seed=batch + 1)
    labels[0] = tiny_unet.num_classes  # null rows pass through as they are
    out = backend(z, logsnr, labels)
    assert out.shape == z.shape
    assert rel_err(out, tiny_unet(z, logsnr, labels)) <= 1e-4


def test_guided_sampler_runs_b_rows_outside_the_interval(backend, monkeypatch):
    rows: list[int] = []
    run = backend.run
    monkeypatch.setattr(backend, "run", lambda z, *a: rows.append(z.shape[0]) or run(z, *a))
    cfgengine.sample(backend, torch.tensor([0, 3, 5]), w=1.0, steps=6,
                     guidance=cfgengine.CFG(interval=(-3.0, 3.0)))
    lam = logsnr_grid(6).tolist()
    assert rows == [6 if -3 <= x <= 3 else 3 for x in lam] and 3 in rows and 6 in rows


@pytest.mark.parametrize("settings", [
    dict(w=torch.tensor([0.0, 0.3, 1.0, 4.0, 0.3]), seed=5),
    dict(w=2.0, seed=9, sampler="ddim"),
    dict(w=1.0, seed=3, sampler="dpmpp_2m", guidance=cfgengine.CFG(interval=(-4.0, 4.0))),
    dict(w=torch.tensor([0.0, 0.3, 1.0, 4.0, 0.3]), seed=7, guidance=cfgengine.CFG(refresh=3)),
])
def test_full_sample_matches_the_torch_model(backend, tiny_unet, settings, rel_err,
                                             sample_tolerance):
    labels = torch.tensor([0, 3, 5, 7, 2])
    ref = cfgengine.sample(tiny_unet, labels, steps=8, **settings)
    out = cfgengine.sample(backend, labels, steps=8, **settings)
    assert rel_err(out, ref) <= sample_tolerance


def test_batch_outside_the_exported_range(backend, traced):
    too_many = 2 * backend.meta.max_batch + 1  # rows: a guided step's doubled batch of max_batch
    with pytest.raises(ValueError, match=f"batch {too_many} is outside"):
        backend(*example_inputs(traced.meta, too_many))


def test_wrong_sample_shape(backend):
    with pytest.raises(ValueError, match="sample shape"):
        backend(torch.zeros(2, 3, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))
