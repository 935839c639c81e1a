"""precision int8 (export/quantize.py, cfgengine/backends/quantized.py) and the CPU precision checks
(cfgengine/cpu.py): refusals, calibration on the sampler's own trajectories, cache keys, and the
int8 network against fp32 within the error its quantization steps allow."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

pytest.importorskip("onnxruntime")

import cfgengine  # noqa: E402
from cfgengine import cpu, precision  # noqa: E402
from cfgengine.backends import quantized  # noqa: E402
from cfgengine.backends import onnxruntime as ort_backend  # noqa: E402
from cfgengine import export  # noqa: E402
from cfgengine.export import onnx as onnx_export, quantize  # noqa: E402
from cfgengine.schedule import LOGSNR_RANGE  # noqa: E402

CAL = quantize.Calibration(guidance=(1.0, 3.0), steps=4, rows=3, seed=0)
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("private_onnx_cache")  # never the user's ~/.cache


@pytest.fixture
def net(tiny_unet):
    return copy.deepcopy(tiny_unet)


def test_int8_refusals_are_one_line(net, gmm):
    for backend in ("torch", "compile"):
        with pytest.raises(ValueError, match="int8 runs a quantized ONNX graph"):
            cfgengine.Sampler(net, precision="int8", backend=backend)
    with pytest.raises(ValueError, match="CPU only"):
        quantized.check_backend("auto", True, torch.device("cuda"))
    with pytest.raises(ValueError, match="needs a torch nn.Module"):
        cfgengine.Sampler(gmm, precision="int8")
    assert precision.autocast_dtype("int8") is None  # the graph takes and returns fp32


def test_a_cpu_without_the_instructions_says_so(net, monkeypatch, capsys):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"sse2"}))
    with pytest.raises(ValueError, match="no AVX2/VNNI int8"):
        cfgengine.Sampler(net, precision="int8")
    cfgengine.Sampler(net, precision="bf16", backend="torch")  # runs, emulated: one line says so
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no native bf16" in err[0]
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    cfgengine.Sampler(net, precision="bf16", backend="torch")
    assert capsys.readouterr().err == ""


def test_calibration_sees_both_halves_over_the_lambda_range(net):
    calls = quantize.calibration_inputs(net, CAL, cfgengine.sample)
    doubled = [c for c in calls if c[0].shape[0] == 2 * CAL.rows]
    assert len(doubled) >= CAL.steps * len(CAL.guidance)
    for z, logsnr, labels in doubled:  # the sampler's doubled batch: cond rows, then null rows
        assert (labels[:CAL.rows] < net.num_classes).all()
        assert (labels[CAL.rows:] == net.num_classes).all()
        assert (z[:CAL.rows] == z[CAL.rows:]).all()
    seen = torch.cat([torch.from_numpy(c[1]) for c in calls])
    lo, hi = LOGSNR_RANGE
    span = hi - lo
    assert seen.min() <= lo + span / CAL.steps and seen.max() >= hi - 2 * span / CAL.steps


def test_cache_key_follows_weights_config_and_settings(net):
    def int8(model, settings=CAL):
        return quantized.Int8Denoiser(model, CPU, cfgengine.sample, settings)

    denoiser = int8(net)
    key = denoiser.key()
    assert denoiser.key() == key == int8(copy.deepcopy(net)).key()
    for changed in (dataclasses.replace(CAL, seed=1), dataclasses.replace(CAL, steps=5),
                    dataclasses.replace(CAL, guidance=(1.0,)), dataclasses.replace(CAL, rows=2)):
        assert int8(net, changed).key() != key
    other = copy.deepcopy(net)
    other.config = dataclasses.replace(other.config, heads=other.config.heads + 1)
    assert int8(other).key() != key  # same weights, another graph
    with torch.no_grad():
        net.conv_out.bias.add_(0.1)  # in place, as an optimizer step would
    assert denoiser.key() != key


def _quantized_depth(path) -> tuple[int, int]:
    """(number of ops with int8 weights, weight bits) of an int8 graph."""
    import onnx

    proto = onnx.load_model(str(path))
    weights = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    ops = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    return len(ops), 7 if quantize.reduce_range() else 8


def test_int8_eps_within_its_quantization_steps_and_is_cached(net, monkeypatch):
    engine = cfgengine.Sampler(net, precision="int8")
    x = engine.sample(torch.tensor([0, 1, 2]), w=1.0, steps=4, seed=3)
    assert engine.backend == "onnxruntime" and engine.model.runtime == "onnxruntime"
    assert torch.isfinite(x).all()
    key = engine.model.net.key()
    path = ort_backend.cache_dir() / f"{key}.onnx"
    # each quantized op rounds its input to 1/255 of its calibrated range (u8) and its weights to
    # 1/(2^bits − 1) of theirs; GroupNorm after every block keeps the relative errors additive
    # along the depth, so |Δε| ≤ depth · (2^-8 + 2^-(bits−1)) · max|ε| to first order
    depth, bits = _quantized_depth(path)
    bound = depth * (2.0 ** -8 + 2.0 ** -(bits - 1))
    graph = onnx_export.load(path, threads=1)
    for z, logsnr, labels in quantize.calibration_inputs(net, quantize.Calibration(
            guidance=(2.0,), steps=5, rows=2, seed=9), cfgengine.sample):
        args = [torch.from_numpy(a) for a in (z, logsnr, labels)]
        with torch.no_grad():
            want = net(*args)
        got = graph(*args)
        assert (got - want).abs().max() <= bound * want.abs().max()
    monkeypatch.setattr(quantize, "quantize", lambda *a, **k: pytest.fail("re-quantized"))
    again = cfgengine.Sampler(net, precision="int8")
    assert torch.equal(again.sample(torch.tensor([0, 1, 2]), w=1.0, steps=4, seed=3), x)


def test_exported_int8_file_loads_and_samples(net, tmp_path):
    path = export.export(net, tmp_path / "m.onnx", format="onnx", precision="int8", max_batch=4,
                         sample=cfgengine.sample)
    model = cfgengine.load(path)
    assert model.info.precision == "int8"
    engine = cfgengine.Sampler(model)
    assert engine.precision == "int8" and engine.model.autocast_dtype is None
    x = engine.sample(torch.tensor([0, 1]), w=1.0, steps=3, seed=0)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="holds int8 weights"):
        cfgengine.Sampler(model, precision="fp32")
