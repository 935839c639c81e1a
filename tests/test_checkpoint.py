"""Checkpoint files: weights_only-loadable ckpt.pt, safetensors export, `cfgengine.load`, atomic writes
that survive a kill, and one clear error for every bad file."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cfgengine
from cfgengine import checkpoint
from cfgengine.cli import main
from cfgengine.train import TrainConfig, train
from cfgengine.unet import UNet


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-step tiny run on gmm images: ckpt.pt and model.safetensors."""
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(data="gmm", preset="tiny", steps=3, batch_size=8, out=str(out)))
    return out


def test_ckpt_loads_with_weights_only(run_dir):
    contents = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert contents["format"] == checkpoint.FORMAT and contents["version"] == checkpoint.VERSION
    assert contents["step"] == 3
    assert {"config", "model_config", "dataset", "model", "ema", "optimizer", "rng"} <= set(contents)


@pytest.mark.parametrize("name", ["ckpt.pt", "model.safetensors"])
def test_load_gives_the_ema_denoiser(run_dir, name):
    net = cfgengine.load(run_dir / name)
    ema = torch.load(run_dir / "ckpt.pt", weights_only=True)["ema"]
    assert isinstance(net, UNet) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    for key, value in net.state_dict().items():
        assert torch.equal(value, ema[key]), key
    assert net.class_names == ("mode0", "mode1", "mode2", "mode3") and net.dataset == "gmm"


def test_builtin_names():
    default = cfgengine.load("default")
    assert isinstance(default, UNet) and default.num_classes == 8
    assert default.sample_shape == (3, 16, 16) and default.clip == 1.0
    assert cfgengine.load("gmm").sample_shape == (2,)


def _truncated(src, dst):
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def test_bad_files_give_one_clear_error(run_dir, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": torch.zeros(2)}, foreign)
    old = tmp_path / "old.pt"
    torch.save({**torch.load(run_dir / "ckpt.pt", weights_only=True), "version": 99}, old)
    cases = [(_truncated(run_dir / "ckpt.pt", tmp_path / "cut.pt"), "truncated or corrupt"),
             (_truncated(run_dir / "model.safetensors", tmp_path / "cut.safetensors"),
              "truncated or corrupt"),
             (foreign, "not a cfgengine"), (old, "version 99"),
             (tmp_path / "missing.pt", "no such file")]
    for path, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
            cfgengine.load(path)
        assert str(path) in str(info.value)


def test_cli_reports_a_bad_model_in_one_line(run_dir, tmp_path, capsys):
    bad = _truncated(run_dir / "ckpt.pt", tmp_path / "cut.pt")
    assert main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err
    assert not (tmp_path / "s.png").exists()


def test_ema_weights_of_round_trip(run_dir, tmp_path):
    path = checkpoint.ema_weights_of(run_dir / "ckpt.pt", tmp_path / "m.safetensors")
    a, b = cfgengine.load(path), cfgengine.load(run_dir / "model.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys, torch
    from cfgengine import checkpoint

    def half_then_die(obj, f):
        with open(f, "wb") as out:
            out.write(b"PK" + bytes(1000))  # a partial zip, then SIGKILL: no cleanup runs
            out.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.torch.save = half_then_die
    checkpoint.save_checkpoint({"step": 2, "model": {"w": torch.ones(3)}}, sys.argv[1])
""")


def test_kill_while_writing_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint({"step": 1, "model": {"w": torch.zeros(3)}}, path)
    result = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(path)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()
    contents = checkpoint.read_checkpoint(path)
    assert contents["step"] == 1 and torch.equal(contents["model"]["w"], torch.zeros(3))
