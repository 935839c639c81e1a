"""TensorRT (experimental): everything that needs no TensorRT — cache keys, profiles, plan files,
stale-engine and error paths — runs everywhere; building and running an engine needs a GPU."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from cfgengine import export
from cfgengine.export import tensorrt as trt_export
from cfgengine.export.program import example_inputs
from cfgengine.export.tensorrt import Profile, Target

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
TARGET = Target("10.9.0", "8.9")


def test_cache_key_changes_with_every_input_and_only_then():
    base = dict(onnx_bytes=b"graph", target=TARGET, profile=Profile(1, 8, 16), precision="fp16")
    key = trt_export.cache_key(**base)
    assert trt_export.cache_key(**base) == key and len(key) == 64
    for change in [dict(onnx_bytes=b"graph2"), dict(target=Target("10.10.0", "8.9")),
                   dict(target=Target("10.9.0", "9.0")), dict(profile=Profile(1, 16, 16)),
                   dict(profile=Profile(2, 8, 16)), dict(precision="fp32")]:
        assert trt_export.cache_key(**{**base, **change}) != key, change


@pytest.mark.parametrize("bounds", [(0, 1, 4), (1, 5, 4), (3, 2, 4), (1, 1, 1), (1, 2.0, 4),
                                    (True, 2, 4)])
def test_invalid_profiles_are_refused(bounds):
    with pytest.raises(ValueError, match="batch"):
        Profile(*bounds)


def test_profile_shapes_cover_every_input_from_b_rows_to_the_doubled_batch():
    shapes = Profile(1, 4, 8).shapes((3, 16, 16))
    assert shapes["z"] == ((1, 3, 16, 16), (8, 3, 16, 16), (16, 3, 16, 16))
    assert shapes["logsnr"] == shapes["labels"] == ((1,), (8,), (16,))


def test_plan_round_trip(tmp_path):
    header = {"key": "k", "tensorrt": "10.9.0"}
    path = trt_export.write_plan(tmp_path / "m.plan", header, b"\x00engine\xff")
    assert trt_export.read_plan(path) == (header, b"\x00engine\xff")


@pytest.mark.parametrize("content", [os.urandom(512), b"", trt_export.MAGIC + b"\x05",
                                     trt_export.MAGIC + (100).to_bytes(8, "little") + b"{}"])
def test_damaged_or_foreign_plans(tmp_path, content):
    path = tmp_path / "bad.engine"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.engine"):
        export.load(path)


def test_plan_without_our_metadata(tmp_path):
    path = trt_export.write_plan(tmp_path / "m.plan", {"key": "k"}, b"engine")
    with pytest.raises(ValueError, match="no cfgengine metadata"):
        export.load(path)


def test_stale_engine_is_refused():
    header = {"tensorrt": "10.9.0", "compute_capability": "8.9"}
    trt_export.check_target(header, TARGET, "m.plan")
    for target in [Target("10.10.0", "8.9"), Target("10.9.0", "9.0")]:
        with pytest.raises(ValueError, match="m.plan: stale engine"):
            trt_export.check_target(header, target, "m.plan")


def test_engine_cache_builds_once_and_rebuilds_damaged_or_mismatched_entries(tmp_path):
    builds = []

    def build():
        builds.append(1)
        return b"engine-%d" % len(builds)

    header = {"key": "a" * 64}
    assert trt_export.cached_engine(tmp_path, header, build) == b"engine-1"
    assert trt_export.cached_engine(tmp_path, header, build) == b"engine-1" and len(builds) == 1
    (tmp_path / f"{'a' * 64}.plan").write_bytes(b"truncated")
    assert trt_export.cached_engine(tmp_path, header, build) == b"engine-2"
    trt_export.write_plan(tmp_path / f"{'a' * 64}.plan", {"key": "b" * 64}, b"other")
    assert trt_export.cached_engine(tmp_path, header, build) == b"engine-3"
    assert trt_export.cached_engine(tmp_path, {"key": "c" * 64}, build) == b"engine-4"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CFGENGINE_CACHE", str(tmp_path))
    assert trt_export.cache_dir() == tmp_path / "tensorrt"


def test_unsupported_precision_and_profile_fail_before_any_work(tiny_unet, tmp_path):
    with pytest.raises(ValueError, match="TensorRT cannot export precision 'bf16'"):
        trt_export.export(tiny_unet, tmp_path / "m.plan", precision="bf16")
    with pytest.raises(ValueError, match="opt batch"):
        trt_export.export(tiny_unet, tmp_path / "m.plan", max_batch=8, opt_batch=9)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed")
def test_missing_tensorrt_is_one_clear_error(tiny_unet, tmp_path):
    with pytest.raises(ValueError, match=r"tensorrt is not installed \(pip install"):
        trt_export.export(tiny_unet, tmp_path / "m.plan")


@pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()),
                    reason="building and running an engine needs TensorRT and a CUDA GPU")
def test_engine_matches_torch(tiny_unet, traced, tmp_path, rel_err):
    from cfgengine.guidance import GuidedDenoiser

    path = trt_export.export_program(traced, tmp_path / "m.plan", profile=Profile(1, 4, 8),
                                     cache=tmp_path / "cache")
    backend = export.load(path)
    inputs = example_inputs(traced.meta, 3, "cuda", seed=3)
    ref = GuidedDenoiser(tiny_unet.to("cuda"))(*inputs)
    tiny_unet.to("cpu")
    assert rel_err(GuidedDenoiser(backend)(*inputs), ref) <= 1e-3  # TF32 tactics
    with pytest.raises(ValueError, match="batch 9 is outside"):
        backend(*example_inputs(traced.meta, 9, "cuda"))


def test_untrusted_plan_is_refused_before_tensorrt_sees_it(traced, tmp_path, monkeypatch):
    """A plan is code (issue 24 item 1): its bytes, read once, must be trusted before TensorRT
    deserializes them; `export.load` of a plan had no trust check at all."""
    from cfgengine import trust

    header = {"meta": traced.meta.to_json(), "tensorrt": "10.9.0", "compute_capability": "8.9"}
    path = trt_export.write_plan(tmp_path / "m.plan", header, b"engine")
    monkeypatch.setattr(trt_export, "_tensorrt", lambda: pytest.fail("TensorRT reached"))
    with pytest.raises(ValueError, match="refusing to load: a TensorRT plan is code"):
        export.load(path)
    trust.record(path)
    with pytest.raises(pytest.fail.Exception, match="TensorRT reached"):
        export.load(path)
