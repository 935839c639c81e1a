"""Exports of a guidance-distilled net: w is the graph's fourth input (one value per row), the
metadata and the loaded backend's ModelInfo say `guidance_embedded`, and the exported backends
(ONNX Runtime, AOTInductor) match the torch net call for call and sample for sample.

The net is a tiny UNet with the w-embedding (tests/tiny_distilled.py)."""
from __future__ import annotations

import json

import pytest
import torch

import cfgengine
from cfgengine import CFG, export
from cfgengine.export import metadata
from cfgengine.export.program import example_inputs, input_names, trace
from cfgengine.schedule import logsnr_grid
from tests.tiny_distilled import tiny_distilled

MAX_BATCH = 8


def rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def student():
    return tiny_distilled()


@pytest.fixture(scope="module")
def traced(student):
    return trace(student, max_batch=MAX_BATCH, source="tiny-distilled")


@pytest.fixture(scope="module", params=["onnx", "aoti"])
def backend(request, traced, tmp_path_factory):
    directory = tmp_path_factory.mktemp("distilled")
    if request.param == "onnx":
        pytest.importorskip("onnxruntime")
        from cfgengine.export import onnx as fmt

        path = fmt.export_program(traced, directory / "student.onnx")
    else:
        from cfgengine.export import aoti as fmt

        path = fmt.export_program(traced, directory / "student.pt2")
    return export.load(path)


def test_traced_program_takes_w(traced):
    assert traced.meta.guidance_embedded
    assert input_names(traced.meta) == ("z", "logsnr", "labels", "w")
    assert len(example_inputs(traced.meta, 3)) == 4


@pytest.mark.parametrize("batch", [1, 3, 2 * MAX_BATCH])
def test_backend_matches_torch_with_w_per_row(backend, student, traced, batch):
    z, logsnr, labels, w = example_inputs(traced.meta, batch, seed=batch)
    labels[0] = student.num_classes  # a null row passes through as it is
    out = backend(z, logsnr, labels, w)
    assert out.shape == (batch, *student.sample_shape)
    assert rel_err(out, student(z, logsnr, labels, w)) <= 1e-5
    other = backend(z, logsnr, labels, w + 1.0)
    assert rel_err(other, out) > 1e-3  # w is really an input of the graph


def test_backend_says_guidance_embedded(backend):
    assert backend.meta.guidance_embedded and backend.info.guidance_embedded
    assert backend.info.exported and backend.info.num_classes == 3


def test_samples_match_torch_with_an_interval(backend, student):
    labels, w = torch.tensor([0, 2, 1, 1]), torch.tensor([0.0, 0.3, 1.0, 4.0])
    lam = logsnr_grid(6).tolist()
    kwargs = dict(w=w, steps=6, sampler="ddim", seed=3, guidance=CFG(interval=(lam[1], lam[4])))
    assert rel_err(cfgengine.sample(backend, labels, **kwargs),
                   cfgengine.sample(student, labels, **kwargs)) <= 1e-4


def test_w_is_required_exactly_when_the_export_takes_it(backend, traced):
    z, logsnr, labels, w = example_inputs(traced.meta, 2)
    with pytest.raises(ValueError, match="needs w of shape") as err:
        backend(z, logsnr, labels)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="needs w of shape"):
        backend(z, logsnr, labels, w[:1])


def test_plain_export_refuses_w(tmp_path):
    pytest.importorskip("onnxruntime")
    from cfgengine.export import onnx as fmt
    from cfgengine.unet import UNet, preset

    plain = trace(UNet(preset("tiny")).eval(), max_batch=2, source="plain")
    backend = export.load(fmt.export_program(plain, tmp_path / "plain.onnx"))
    z, logsnr, labels = example_inputs(plain.meta, 2)
    assert not backend.info.guidance_embedded
    with pytest.raises(ValueError, match="takes no w"):
        backend(z, logsnr, labels, torch.ones(2))


def test_metadata_without_the_field_reads_as_not_embedded(traced):
    stored = json.loads(traced.meta.to_json())
    del stored["guidance_embedded"]
    assert metadata.parse(json.dumps(stored), "old.onnx").guidance_embedded is False
    stored["guidance_embedded"] = "yes"
    with pytest.raises(ValueError, match="guidance_embedded"):
        metadata.parse(json.dumps(stored), "edited.onnx")
