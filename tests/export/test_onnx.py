"""ONNX export + ONNX Runtime backend against the torch GuidedDenoiser (reference)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

import cfgengine  # noqa: E402
from cfgengine import export  # noqa: E402
from cfgengine.export import metadata  # noqa: E402
from cfgengine.export import onnx as onnx_export  # noqa: E402
from cfgengine.export.program import EXAMPLE_BATCH, cast_for_export, example_inputs  # noqa: E402
from cfgengine.guidance import GuidedDenoiser  # noqa: E402


@pytest.fixture(scope="module")
def backend(onnx_path):
    return export.load(onnx_path)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_matches_torch_at_batch_sizes_other_than_the_example(backend, tiny_unet, traced, batch,
                                                             rel_err):
    assert batch != EXAMPLE_BATCH
    inputs = example_inputs(traced.meta, batch, seed=batch)
    ref = GuidedDenoiser(tiny_unet)(*inputs)  # (2B, C, H, W)
    out = backend(*inputs)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-4


def test_batch_dimension_is_symbolic_in_the_saved_graph(onnx_path):
    proto = onnx.load(str(onnx_path))
    for value in list(proto.graph.input) + list(proto.graph.output):
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param and not first.HasField("dim_value"), value.name
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = EXAMPLE_BATCH
    with pytest.raises(ValueError, match="froze the batch dimension"):
        onnx_export.check_symbolic_batch(proto)


def test_null_half_is_a_forward_with_the_null_label(backend, tiny_unet, traced, rel_err):
    z, logsnr, labels = example_inputs(traced.meta, 5, seed=11)
    null = torch.full_like(labels, tiny_unet.num_classes)
    eps2 = backend(z, logsnr, labels)
    assert rel_err(eps2[5:], tiny_unet(z, logsnr, null)) <= 1e-4
    assert rel_err(eps2[:5], tiny_unet(z, logsnr, labels)) <= 1e-4


def test_carries_the_model_metadata(backend, tiny_unet, onnx_path):
    assert backend.returns_doubled is True
    assert backend.num_classes == tiny_unet.num_classes
    assert backend.sample_shape == tuple(tiny_unet.sample_shape)
    assert backend.clip == tiny_unet.clip
    assert backend.meta.source_sha256 == metadata.weights_sha256(tiny_unet)
    assert backend.meta.schedule == metadata.SCHEDULE and backend.meta.precision == "fp32"
    stored = {p.key for p in onnx.load(str(onnx_path)).metadata_props}
    assert metadata.KEY in stored


def test_cpu_session_uses_one_thread_per_physical_core(backend):
    assert backend.providers == ["CPUExecutionProvider"]
    cores = onnx_export.physical_cores()
    assert 1 <= cores <= os.cpu_count()
    assert backend.session.get_session_options().intra_op_num_threads == cores


def test_full_sample_matches_the_torch_model(backend, tiny_unet, rel_err, sample_tolerance):
    labels = torch.tensor([0, 3, 5, 7, 2])
    w = torch.tensor([0.0, 0.3, 1.0, 4.0, 0.3])
    ref = cfgengine.sample(tiny_unet, labels, w=w, steps=8, seed=5)
    out = cfgengine.sample(backend, labels, w=w, steps=8, seed=5)
    assert rel_err(out, ref) <= sample_tolerance


def test_fp16_cast_keeps_normalisations_in_fp32(tiny_unet, traced, rel_err):
    net = cast_for_export(tiny_unet, "fp16")
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert net.conv_in.weight.dtype == torch.float16
    inputs = example_inputs(traced.meta, 3, seed=1)
    assert rel_err(net(*inputs), tiny_unet(*inputs)) <= 2e-2


def test_bf16_is_refused_before_any_work(tiny_unet, tmp_path):
    with pytest.raises(ValueError, match="ONNX cannot export precision 'bf16'"):
        onnx_export.export(tiny_unet, tmp_path / "m.onnx", precision="bf16")
    assert list(tmp_path.iterdir()) == []


def test_batch_outside_the_exported_range(backend, traced):
    too_many = backend.meta.max_batch + 1
    with pytest.raises(ValueError, match=f"batch {too_many} is outside"):
        backend(*example_inputs(traced.meta, too_many))


def test_wrong_sample_shape(backend):
    with pytest.raises(ValueError, match="sample shape"):
        backend(torch.zeros(2, 3, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_onnx_without_our_metadata(onnx_path, tmp_path):
    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save_model(proto, str(foreign))
    with pytest.raises(ValueError, match="foreign.onnx: no cfgengine metadata"):
        export.load(foreign)


def test_other_format_version(onnx_path, tmp_path):
    proto = onnx.load(str(onnx_path))
    entry = next(p for p in proto.metadata_props if p.key == metadata.KEY)
    entry.value = entry.value.replace(f'"version": {metadata.VERSION}', '"version": 99')
    old = tmp_path / "old.onnx"
    onnx.save_model(proto, str(old))
    with pytest.raises(ValueError, match="version 99"):
        export.load(old)


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="junk.onnx: not a readable ONNX model"):
        export.load(junk)


def test_cuda_without_onnxruntime_gpu_fails_loudly(onnx_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: the CUDA EP exists")
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        export.load(onnx_path, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_execution_provider_is_active(onnx_path, tiny_unet, traced, rel_err):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    backend = export.load(onnx_path, device="cuda")
    assert backend.providers[0] == "CUDAExecutionProvider"
    inputs = example_inputs(traced.meta, 3, "cuda", seed=3)
    ref = GuidedDenoiser(copy.deepcopy(tiny_unet).cuda())(*inputs)
    assert rel_err(backend(*inputs), ref) <= 1e-3  # TF32/cuDNN algorithm differences
