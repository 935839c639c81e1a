"""ONNX specifics: symbolic batch in the saved graph, stored metadata, session settings, fp16
casting, foreign files and providers (parity against torch is in test_artifact.py)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from cfgengine import export, threads  # noqa: E402
from cfgengine.export import metadata  # noqa: E402
from cfgengine.export import onnx as onnx_export  # noqa: E402
from cfgengine.export.program import EXAMPLE_BATCH, cast_for_export, example_inputs  # noqa: E402
from cfgengine.guidance import GuidedDenoiser  # noqa: E402


@pytest.fixture(scope="module")
def backend(onnx_path):
    return export.load(onnx_path)


def test_batch_dimension_is_symbolic_in_the_saved_graph(onnx_path):
    proto = onnx.load(str(onnx_path))
    for value in list(proto.graph.input) + list(proto.graph.output):
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param and not first.HasField("dim_value"), value.name
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = EXAMPLE_BATCH
    with pytest.raises(ValueError, match="froze the batch dimension"):
        onnx_export.check_symbolic_batch(proto)


def test_metadata_is_stored_in_the_model(onnx_path):
    stored = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert metadata.parse(stored[metadata.KEY], onnx_path).format == metadata.FORMAT


def test_cpu_session_uses_the_thread_selection(backend):
    assert backend.providers == ["CPUExecutionProvider"]
    chosen = threads.intra_op_threads()
    assert chosen >= 1
    assert backend.session.get_session_options().intra_op_num_threads == chosen


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
    assert rel_err(GuidedDenoiser(backend)(*inputs), ref) <= 1e-3  # TF32/cuDNN algorithms

