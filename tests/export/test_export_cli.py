"""`cfgengine export`: user errors are exit code 2 with one line on stderr and no file left."""
from __future__ import annotations

import importlib.util

import pytest

from cfgengine import checkpoint
from cfgengine.cli import main


@pytest.fixture(scope="module")
def model_file(tiny_unet, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    dataset = {"name": "test", "class_names": [], "shape": list(tiny_unet.sample_shape)}
    return checkpoint.save_ema_weights(tiny_unet.state_dict(), checkpoint.config_dict(
        tiny_unet.config), dataset, path)


def _fails(args: list[str], capsys, tmp_path) -> str:
    before = set(tmp_path.iterdir())
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cfgengine: error: ") and err.count("\n") == 1, err
    assert set(tmp_path.iterdir()) == before  # nothing half-written, no temp file
    return err


def test_toy_mixture_is_not_exportable(capsys, tmp_path):
    err = _fails(["gmm", "--format", "onnx", "-o", str(tmp_path / "g.onnx")], capsys, tmp_path)
    assert "not a torch nn.Module" in err


@pytest.mark.parametrize("flags, out, message", [
    (["--format", "onnx", "--precision", "bf16"], "m.onnx", "ONNX cannot export precision 'bf16'"),
    (["--format", "onnx", "--max-batch", "1"], "m.onnx", "max batch must be an integer ≥ 2"),
    (["--format", "onnx", "--device", "cuda"], "m.onnx", "--device applies to aoti and tensorrt"),
    (["--format", "aoti"], "m.onnx", "must be named *.pt2"),
    (["--format", "tflite"], "m.onnx", "invalid choice"),
])
def test_bad_flags(model_file, capsys, tmp_path, flags, out, message):
    assert message in _fails([str(model_file), *flags, "-o", str(tmp_path / out)], capsys, tmp_path)


def test_file_that_is_not_a_model(capsys, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    err = _fails([str(junk), "--format", "onnx", "-o", str(tmp_path / "m.onnx")], capsys, tmp_path)
    assert "junk.safetensors" in err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT installed")
def test_tensorrt_without_tensorrt(model_file, capsys, tmp_path):
    err = _fails([str(model_file), "--format", "tensorrt", "-o", str(tmp_path / "m.plan")],
                 capsys, tmp_path)
    assert "pip install" in err


def test_export_help_labels_tensorrt_experimental(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "EXPERIMENTAL" in capsys.readouterr().out


def test_export_writes_a_loadable_model(model_file, tiny_unet, tmp_path, capsys, rel_err):
    from cfgengine import export
    from cfgengine.export import metadata
    from cfgengine.export.program import example_inputs
    from cfgengine.guidance import GuidedDenoiser

    pytest.importorskip("onnxruntime")
    out = tmp_path / "tiny.onnx"
    assert main(["export", str(model_file), "--format", "onnx", "--max-batch", "4",
                 "-o", str(out)]) == 0
    assert f"-> {out}" in capsys.readouterr().out and list(tmp_path.iterdir()) == [out]
    backend = export.load(out)
    assert backend.meta.source == str(model_file) and backend.meta.max_batch == 4
    assert backend.meta.source_sha256 == metadata.weights_sha256(tiny_unet)
    inputs = example_inputs(backend.meta, 3, seed=2)
    assert rel_err(GuidedDenoiser(backend)(*inputs), GuidedDenoiser(tiny_unet)(*inputs)) <= 1e-4
