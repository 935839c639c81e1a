"""The CPU `auto` / `onnxruntime` backend (cfgengine/backends/onnxruntime.py): full samples equal
eager torch, the choice and its clean fallbacks, and a cache that never serves a stale session."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")

import cfgengine  # noqa: E402
from cfgengine.backends import onnxruntime as ort_backend  # noqa: E402

LABELS = torch.tensor([0, 3, 1, 2, 0])
W = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.3])
STEPS = 6


pytestmark = pytest.mark.usefixtures("private_onnx_cache")  # never the user's ~/.cache


@pytest.fixture
def net(tiny_unet):
    """A private copy of the session's tiny UNet: tests below change weights in place."""
    return copy.deepcopy(tiny_unet)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def eager(net, **kw) -> torch.Tensor:
    return cfgengine.sample(net, LABELS, w=W, steps=STEPS, seed=4, backend="torch", **kw)


def test_auto_on_cpu_runs_onnxruntime_and_equals_eager(net, monkeypatch):
    monkeypatch.setattr(ort_backend, "AUTO_EXPORT_ROW_STEPS", 1)  # this small call pays
    engine = cfgengine.Sampler(net, device="cpu")
    assert engine.backend == "onnxruntime"
    x = engine.sample(LABELS, w=W, steps=STEPS, seed=4)
    assert engine.model.runtime == "onnxruntime"
    assert rel(x, eager(net)) < 1e-4
    unguided = engine.sample(None, n=3, steps=STEPS, seed=4)  # the doubled graph, sliced
    want = cfgengine.sample(net, None, n=3, steps=STEPS, seed=4, backend="torch")
    assert rel(unguided, want) < 1e-4


def test_small_uncached_calls_stay_eager(net):
    net.conv_out.bias.data.add_(0.25)  # weights no other test exported: nothing cached
    engine = cfgengine.Sampler(net)
    x = engine.sample(LABELS, w=W, steps=STEPS, seed=4)  # 30 row-steps: not worth an export
    assert engine.model.runtime == "torch"
    assert not ort_backend.cached(engine.model.net.key())
    assert torch.equal(x, eager(net))


def test_explicit_backend_and_cli_choice(net):
    from cfgengine.cli import build_parser

    engine = cfgengine.Sampler(net, backend="onnxruntime")
    assert rel(engine.sample(LABELS, w=W, steps=STEPS, seed=4), eager(net)) < 1e-4
    refresh = cfgengine.CFG(refresh=2)  # B-row steps between the 2B-row ones
    assert rel(engine.sample(LABELS, w=W, steps=STEPS, seed=4, guidance=refresh),
               eager(net, guidance=refresh)) < 1e-4
    assert build_parser().parse_args(["sample", "--backend", "onnxruntime"]).backend == \
        "onnxruntime"
    with pytest.raises(ValueError, match="bf16"):
        cfgengine.Sampler(net, backend="onnxruntime", precision="bf16")


def test_auto_is_eager_without_onnxruntime_or_at_bf16(net, monkeypatch):
    assert cfgengine.Sampler(net, precision="bf16").backend == "torch"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    assert not ort_backend.available()
    engine = cfgengine.Sampler(net)
    assert engine.backend == "torch"
    assert torch.equal(engine.sample(LABELS, w=W, steps=STEPS, seed=4), eager(net))


def test_a_net_over_the_onnx_file_limit_stays_on_torch(net, monkeypatch):
    """One ONNX file holds under 2 GiB (no external data is written): a bigger net — a real
    SD UNet in fp32 — runs eager under auto, and an explicit onnxruntime is one line."""
    import cfgengine.backends as backends

    size = 4 * sum(p.numel() for p in (*net.parameters(), *net.buffers()))  # fp32 bytes
    monkeypatch.setattr(backends, "ONNX_WEIGHT_LIMIT", size)  # this net is "too big" now
    assert cfgengine.Sampler(net).backend == "torch"
    with pytest.raises(ValueError, match="under 2 GiB.*backend torch or compile"):
        cfgengine.Sampler(net, backend="onnxruntime")
    monkeypatch.setattr(backends, "ONNX_WEIGHT_LIMIT", size + 1)
    assert cfgengine.Sampler(net).backend == "onnxruntime"


def test_failed_export_falls_back_with_one_warning_line(net, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded\nwith a long traceback-like tail")
    monkeypatch.setattr(ort_backend, "_export", broken)
    monkeypatch.setattr(ort_backend, "AUTO_EXPORT_ROW_STEPS", 1)
    net.conv_out.bias.data.add_(0.5)  # not cached by another test
    engine = cfgengine.Sampler(net)
    x = engine.sample(LABELS, w=W, steps=STEPS, seed=4)
    engine.sample(LABELS, w=W, steps=STEPS, seed=4)  # no retry, no second warning
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "exporter exploded" in lines[0] and "eager torch" in lines[0]
    assert engine.model.runtime == "torch" and torch.equal(x, eager(net))
    with pytest.raises(ValueError, match="exporter exploded"):
        cfgengine.Sampler(net, backend="onnxruntime").sample(LABELS, w=W, steps=STEPS)


def test_changed_weights_never_reuse_a_stale_session(net, monkeypatch):
    monkeypatch.setattr(ort_backend, "AUTO_EXPORT_ROW_STEPS", 1)
    engine = cfgengine.Sampler(net)
    before = engine.sample(LABELS, w=W, steps=STEPS, seed=4)
    old_key = engine.model.net.key()
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(1.1)  # in place, as load_state_dict or an optimizer step does
    after = engine.sample(LABELS, w=W, steps=STEPS, seed=4)  # the same Sampler
    assert engine.model.net.key() != old_key and engine.model.runtime == "onnxruntime"
    assert rel(after, eager(net)) < 1e-4 and rel(after, before) > 1e-3


def test_key_covers_shape_precision_and_weight_files(net, tmp_path):
    from cfgengine.checkpoint import config_dict, save_ema_weights

    shape = tuple(net.sample_shape)
    key = ort_backend.cache_key(net, "fp32", shape)
    assert key != ort_backend.cache_key(net, "fp32", (shape[0], 2 * shape[1], 2 * shape[2]))
    assert key != ort_backend.cache_key(net, "fp16", shape)
    files = {}
    for name in ("a", "b"):  # a weight file, then the same file name with one weight changed
        files[name] = save_ema_weights(net.state_dict(), config_dict(net.config),
                                       {"name": "test", "class_names": []},
                                       tmp_path / f"{name}.safetensors")
        with torch.no_grad():
            net.conv_out.weight.view(-1)[0].add_(1e-3)
    a, b = cfgengine.load(files["a"]), cfgengine.load(files["b"])
    assert ort_backend.cache_key(a, "fp32", shape) == key
    assert ort_backend.cache_key(b, "fp32", shape) != key
