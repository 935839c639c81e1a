"""`cfgengine.load`: built-in names and model files give the EMA Denoiser, and every bad file one
clear error (also through the CLI)."""
import pytest
import torch

import cfgengine
from cfgengine.cli import main
from cfgengine.train import TrainConfig, train
from cfgengine.unet import UNet


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-step tiny run on gmm images: ckpt.pt and model.safetensors."""
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(data="gmm", preset="tiny", steps=3, batch_size=8, out=str(out)))
    return out


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
