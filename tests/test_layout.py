"""The house: every module of the package imports by its dotted name and is a module (no function
or other attribute shadows a submodule), and the old CLI spellings still work."""
import importlib
import types

import pytest

import cfgengine
from cfgengine.cli import build_parser, main
from tests import installed

MODULES = installed.modules()


def test_the_walk_finds_the_mapped_packages():
    for name in ("cfgengine.kernels.step", "cfgengine.export.onnx", "cfgengine.bench.harness",
                 "cfgengine.cli.sample"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_and_is_not_shadowed(name):
    module = importlib.import_module(name)
    assert isinstance(module, types.ModuleType)
    parent, _, leaf = name.rpartition(".")
    if parent:
        attribute = getattr(importlib.import_module(parent), leaf)
        assert attribute is module, f"{parent}.{leaf} is {attribute!r}, not the module {name}"


def test_module_basenames_in_tests_are_unique():
    from pathlib import Path

    files = [p.name for p in Path(__file__).parent.rglob("test_*.py")]
    assert len(files) == len(set(files)), sorted(f for f in files if files.count(f) > 1)


def test_old_sampler_spelling_still_parses():
    args = build_parser().parse_args(["sample", "--solver", "ddim"])
    assert args.sampler == "ddim"
    args = build_parser().parse_args(["bench", "--solver", "ddim"])
    assert args.sampler == "ddim"


def test_old_train_export_spelling_still_parses(tmp_path):
    args = build_parser().parse_args(["train", "--export", str(tmp_path / "m.safetensors")])
    assert args.ema_weights == str(tmp_path / "m.safetensors")


def test_old_sampler_spelling_samples_quietly(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["sample", "--ckpt", "gmm", "--steps", "3", "--n", "2", "--solver", "ddim",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert out.is_file() and captured.err == ""
    assert "ddim" not in captured.out or "deprecated" not in captured.out.lower()


def test_old_train_export_spelling_writes_the_ema_weights(tmp_path, capsys):
    weights = tmp_path / "ema.safetensors"
    assert main(["train", "--data", "gmm", "--preset", "tiny", "--steps", "2", "--batch-size", "4",
                 "--out", str(tmp_path / "run"), "--export", str(weights)]) == 0
    assert weights.is_file() and capsys.readouterr().err == ""
    assert cfgengine.load(weights).num_classes == 4
