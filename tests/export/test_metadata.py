"""The metadata every export carries: round trip, refusal of foreign or stale JSON, weights hash."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cfgengine.export import metadata
from cfgengine.model import info as model_info


def test_round_trip(tiny_unet):
    meta = metadata.describe(tiny_unet, "fp16", 8, "tiny.safetensors")
    assert metadata.parse(meta.to_json(), "m.onnx") == meta
    assert meta.sample_shape == (3, 16, 16) and meta.clip == 1.0 and meta.max_batch == 8
    assert meta.logsnr_range == (-20.0, 20.0) and meta.version == 2


def test_records_the_models_logsnr_range(tiny_unet, monkeypatch):
    facts = dataclasses.replace(model_info(tiny_unet), logsnr_range=(-15.0, 12.5))
    monkeypatch.setattr(tiny_unet, "info", facts, raising=False)  # a model's own facts
    meta = metadata.describe(tiny_unet, "fp32", 4, None)
    assert metadata.parse(meta.to_json(), "m.onnx").logsnr_range == (-15.0, 12.5)


def test_version_1_files_are_refused_with_re_export():
    with pytest.raises(ValueError, match="version 1, this cfgengine reads version 2; re-export"):
        metadata.parse(json.dumps({"format": metadata.FORMAT, "version": 1}), "old.onnx")


@pytest.mark.parametrize("text, message", [
    ("not json", "not valid JSON"),
    (json.dumps({"format": "other"}), "not of format"),
    (json.dumps({"format": metadata.FORMAT, "version": 0}), "version 0"),
    (json.dumps({"format": metadata.FORMAT, "version": metadata.VERSION}), "missing or unknown"),
])
def test_foreign_or_stale_metadata(text, message):
    with pytest.raises(ValueError, match=f"m.pt2: .*{message}"):
        metadata.parse(text, "m.pt2")


def test_weights_hash_covers_scalars_and_changes_with_any_weight():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    before = metadata.weights_sha256(net)  # BatchNorm's num_batches_tracked is a 0-d tensor
    assert metadata.weights_sha256(net) == before
    with torch.no_grad():
        net[0].bias[2] += 1e-3
    assert metadata.weights_sha256(net) != before
