"""AOTInductor `.pt2` specifics: device binding, bad packages and names (its parity against torch
is in test_artifact.py, shared with ONNX)."""
from __future__ import annotations

import os

import pytest
import torch

from cfgengine import export
from cfgengine.export import aoti


def test_loads_on_the_device_it_was_compiled_for(aoti_path):
    backend = export.load(aoti_path)
    assert isinstance(backend, aoti.AotiBackend) and backend.device == torch.device("cpu")


def test_package_runs_only_on_its_device(aoti_path):
    with pytest.raises(ValueError, match="compiled for cpu, cannot run on cuda"):
        aoti.load(aoti_path, device="cuda")


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="junk.pt2: refusing to load"):
        export.load(junk)  # not exported here: untrusted code, refused before it is opened
    with pytest.raises(ValueError, match="junk.pt2: not a loadable AOTInductor package"):
        export.load(junk, trust_code=True)


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
