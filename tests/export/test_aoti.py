"""AOTInductor `.pt2` export + backend against the torch GuidedDenoiser (reference), on CPU."""
from __future__ import annotations

import os

import pytest
import torch

import cfgengine
from cfgengine import export
from cfgengine.export import aoti, metadata
from cfgengine.export.program import EXAMPLE_BATCH, example_inputs
from cfgengine.guidance import GuidedDenoiser


@pytest.fixture(scope="module")
def backend(aoti_path):
    return export.load(aoti_path)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_matches_torch_at_batch_sizes_other_than_the_example(backend, tiny_unet, traced, batch,
                                                             rel_err):
    assert batch != EXAMPLE_BATCH
    inputs = example_inputs(traced.meta, batch, seed=batch)
    ref = GuidedDenoiser(tiny_unet)(*inputs)  # (2B, C, H, W)
    out = backend(*inputs)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4


def test_carries_the_model_metadata(backend, tiny_unet):
    assert isinstance(backend, aoti.AotiBackend) and backend.returns_doubled is True
    assert backend.device == torch.device("cpu")
    assert (backend.num_classes, backend.sample_shape, backend.clip) == \
        (tiny_unet.num_classes, tuple(tiny_unet.sample_shape), tiny_unet.clip)
    assert backend.meta.source_sha256 == metadata.weights_sha256(tiny_unet)


def test_full_sample_matches_the_torch_model(backend, tiny_unet, rel_err, sample_tolerance):
    labels = torch.tensor([1, 4, 6])
    ref = cfgengine.sample(tiny_unet, labels, w=2.0, steps=8, seed=9, sampler="ddim")
    out = cfgengine.sample(backend, labels, w=2.0, steps=8, seed=9, sampler="ddim")
    assert rel_err(out, ref) <= sample_tolerance


def test_batch_outside_the_exported_range(backend, traced):
    too_many = backend.meta.max_batch + 1
    with pytest.raises(ValueError, match=f"batch {too_many} is outside"):
        backend(*example_inputs(traced.meta, too_many))


def test_package_runs_only_on_its_device(aoti_path):
    with pytest.raises(ValueError, match="compiled for cpu, cannot run on cuda"):
        aoti.load(aoti_path, device="cuda")


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="junk.pt2: not a loadable AOTInductor package"):
        export.load(junk)


def test_bad_names_and_precisions_fail_before_compiling(traced, tiny_unet, tmp_path):
    with pytest.raises(ValueError, match=r"must be named \*\.pt2"):
        aoti.export_program(traced, tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="cannot export precision 'int8'"):
        aoti.export(tiny_unet, tmp_path / "model.pt2", precision="int8")
    with pytest.raises(ValueError, match="unknown export format"):
        export.export(tiny_unet, tmp_path / "model.pt2", format="tflite")
    assert list(tmp_path.iterdir()) == []


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not an exported model"):
        export.load(tmp_path / "model.bin")
