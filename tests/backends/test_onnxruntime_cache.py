"""The ONNX Runtime graph cache never serves a stale or foreign graph (issue 24, items 4, 5, 6,
20): the key covers the settings forward depends on, weights changed behind torch's version
counters, graphs of other models under a key, folders others can write, killed writes' temp
files and corrupt entries. Each case compares the cached backend's samples with eager torch."""
from __future__ import annotations

import copy
import json
import os
import shutil
import time

import pytest
import torch

pytest.importorskip("onnxruntime")

import cfgengine  # noqa: E402
from cfgengine.export import metadata, onnx as onnx_export  # noqa: E402
from cfgengine.backends import onnxruntime as ort_backend  # noqa: E402

LABELS = torch.tensor([0, 3, 1, 2])
STEPS = 4


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private, empty cache folder and in-memory cache for every test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CFGENGINE_CACHE_DIR", str(folder))
    monkeypatch.setattr(ort_backend, "_SESSIONS", ort_backend.OrderedDict())
    return folder / "onnx"


@pytest.fixture
def net(tiny_unet):
    return copy.deepcopy(tiny_unet)


def run(model, backend="onnxruntime", **kw) -> torch.Tensor:
    return cfgengine.sample(model, LABELS, w=1.5, steps=STEPS, seed=3, backend=backend, **kw)


def assert_eager(model, x: torch.Tensor) -> None:
    ref = run(model, backend="torch").double()
    rel = float((x.double() - ref).norm() / ref.norm())
    assert rel < 1e-4, rel


# ---------------------------------------------------------------------------------------------
# 4. the key covers what forward depends on besides the weights


def test_prediction_type_edited_in_a_diffusers_folder_is_another_graph(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from tests.test_adapters import tiny_unet

    folder = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler()).save_pretrained(
        folder)
    eps_model = cfgengine.load(str(folder))
    run(eps_model)  # exports and caches the epsilon graph
    moved = cfgengine.load(str(shutil.copytree(folder, tmp_path / "moved")))
    shape = eps_model.sample_shape
    assert ort_backend.cache_key(moved, "fp32", shape) == \
        ort_backend.cache_key(eps_model, "fp32", shape)  # the same model in another folder
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()),
                                      prediction_type="v_prediction")))
    v_model = cfgengine.load(str(folder))  # same weights file, same classes
    ort_backend._SESSIONS.clear()  # a new process: only the disk cache is shared
    assert_eager(v_model, run(v_model))


class Scaled(torch.nn.Module):
    """A user's denoiser that states nothing: its plain attribute `scale` changes forward."""

    def __init__(self, scale: float):
        super().__init__()
        self.conv, self.embed = torch.nn.Conv2d(3, 3, 1), torch.nn.Embedding(5, 3)
        self.num_classes, self.sample_shape, self.scale = 4, (3, 8, 8), scale

    def forward(self, z, logsnr, labels):
        shift = self.embed(labels)[:, :, None, None] + 0.1 * logsnr[:, None, None, None]
        return self.conv(z) * self.scale + shift


def test_a_plain_attribute_of_a_model_that_states_nothing_changes_the_key():
    torch.manual_seed(0)
    one = Scaled(1.0)
    two = copy.deepcopy(one)
    two.scale = 3.0
    shape = one.sample_shape
    assert ort_backend.cache_key(one, "fp32", shape) != ort_backend.cache_key(two, "fp32", shape)
    run(one)
    assert_eager(two, run(two))


# ---------------------------------------------------------------------------------------------
# 5. weights changed behind the version counters


@pytest.mark.parametrize("how", ["data_mul", "data_assign", "assign_state_dict"])
def test_weights_changed_behind_version_counters_are_re_exported(net, how):
    engine = cfgengine.Sampler(net, backend="onnxruntime")
    before = engine.sample(LABELS, w=1.5, steps=STEPS, seed=3)
    params = list(net.parameters())
    if how == "data_mul":
        for p in params:
            p.data.mul_(1.1)
    elif how == "data_assign":
        for p in params:
            p.data = p.data * 1.1
    else:
        net.load_state_dict({k: v * 1.1 for k, v in net.state_dict().items()}, assign=True)
    after = engine.sample(LABELS, w=1.5, steps=STEPS, seed=3)  # the same Sampler
    assert float((after - before).abs().max()) > 1e-3
    assert_eager(net, after)


# ---------------------------------------------------------------------------------------------
# 6. foreign graphs and folders others can write


def test_another_models_graph_under_the_key_is_never_used(net, cache):
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.conv_out.weight.mul_(2.0)
    run(other)
    (foreign,) = cache.glob("*.onnx")
    key = ort_backend.cache_key(net, "fp32", tuple(net.sample_shape))
    shutil.copy(foreign, cache / f"{key}.onnx")  # a valid graph of other weights, our name
    ort_backend._SESSIONS.clear()
    assert_eager(net, run(net))
    replaced = onnx_export.read_metadata(cache / f"{key}.onnx")  # exported again, ours now
    assert replaced.source_sha256 == metadata.weights_sha256(net)


def test_a_world_writable_cache_folder_is_refused(net, cache, monkeypatch, capsys):
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    with pytest.raises(ValueError, match="writable by every user") as err:
        run(net)
    assert str(cache) in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(ort_backend, "AUTO_EXPORT_ROW_STEPS", 1)
    engine = cfgengine.Sampler(net)  # auto: a private temporary folder, one warning line
    assert_eager(net, engine.sample(LABELS, w=1.5, steps=STEPS, seed=3))
    assert engine.model.runtime == "onnxruntime"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "writable by every user" in lines[0], lines
    assert list(cache.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_a_cache_folder_of_another_user_is_refused(net, cache):
    cache.mkdir(parents=True)
    os.chown(cache, 12345, 12345)
    with pytest.raises(ValueError, match="belongs to another user"):
        run(net)


# ---------------------------------------------------------------------------------------------
# 20. killed writes and corrupt entries


def test_stale_temp_files_are_swept_on_the_next_write(net, cache):
    cache.mkdir(parents=True)
    stale, fresh = cache / ".abc.onnx.x1y2.onnx", cache / ".def.onnx.z3w4.onnx"
    for tmp in (stale, fresh):
        tmp.write_bytes(b"half a graph")
    old = time.time() - 2 * 86400  # two days: a killed write, not one in progress
    os.utime(stale, (old, old))
    run(net)
    assert not stale.exists() and fresh.exists()  # a write in progress elsewhere is kept


def test_a_corrupt_entry_is_exported_again(net, cache):
    key = ort_backend.cache_key(net, "fp32", tuple(net.sample_shape))
    cache.mkdir(parents=True)
    (cache / f"{key}.onnx").write_bytes(b"\x08\x07garbage")
    assert_eager(net, run(net))
    ort_backend._SESSIONS.clear()
    assert_eager(net, run(net))  # now read from the repaired entry


def test_a_corrupt_entry_that_cannot_be_replaced_names_the_file(net, cache, monkeypatch):
    key = ort_backend.cache_key(net, "fp32", tuple(net.sample_shape))
    cache.mkdir(parents=True)
    path = cache / f"{key}.onnx"
    path.write_bytes(b"\x08\x07garbage")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")
    monkeypatch.setattr(ort_backend, "_export", broken)
    with pytest.raises(ValueError) as err:
        run(net)
    message = str(err.value)
    assert str(path) in message and "delete" in message and "\n" not in message
