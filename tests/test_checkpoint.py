"""Checkpoint files: weights_only-loadable ckpt.pt, EMA weights as safetensors, atomic writes that
survive a kill."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cfgengine
from cfgengine import checkpoint
from cfgengine.train import TrainConfig, train


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
