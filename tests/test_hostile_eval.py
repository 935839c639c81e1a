"""Issue 14, evaluation and classifier training as a hostile user would drive them (items 1, 8,
9, 10): feature networks load without any pickle path (TorchScript only when trusted), models
whose samples do not match the reference are refused, a wrong feature network is one line, and
classifier-training flags are checked before any work."""
from __future__ import annotations

import pickle
import zipfile

import pytest
import torch

from tests.conftest import cli_fails as _fails
from cfgengine import checkpoint, metrics
from cfgengine.checkpoint import ASSETS
from cfgengine.unet import UNet, preset

DEFAULT = str(ASSETS / "default.safetensors")




def _eval(tmp_path, *flags):
    return ["eval", "--steps", "2", "--n", "8", "--w", "0", "--bootstrap", "2",
            "--out-dir", str(tmp_path / "eval"), "--cache-dir", str(tmp_path / "cache"), *flags]


class Pooled(torch.nn.Module):
    """A stand-in feature network on 3×16×16 images: mean-pooled channels → 4 features."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.linear(x.mean((2, 3)))


class Exec:
    """Unpickling this runs `code` (what a hostile sample_inputs member does)."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


@pytest.fixture
def feature_pt2(tmp_path):
    path = tmp_path / "features.pt2"
    torch.export.save(torch.export.export(Pooled(), (torch.zeros(2, 3, 16, 16),)), path)
    return path


def test_feature_pt2_with_a_pickle_is_refused_and_nothing_runs(feature_pt2, tmp_path, capsys):
    """torch.export.load fell back to weights_only=False for data/sample_inputs (item 1)."""
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt2"
    payload = pickle.dumps(Exec(f"open({str(marker)!r}, 'w').write('ran')"))
    with zipfile.ZipFile(feature_pt2) as src, zipfile.ZipFile(evil, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, payload if "sample_inputs" in name else src.read(name))
    _fails(capsys, _eval(tmp_path, "--ckpt", DEFAULT, "--features", str(evil)),
           "not plain tensors")
    assert not marker.exists() and not (tmp_path / "eval").exists()
    with pytest.raises(Exception):  # what the refusal prevents: torch's own loader runs it
        torch.export.load(str(evil))
    assert marker.exists()


def test_clean_feature_pt2_loads_as_data(feature_pt2):
    features, probs = metrics.network_extractor(feature_pt2)(torch.zeros(2, 3, 16, 16))
    assert features.shape == (2, 4) and probs is None


def test_torchscript_features_need_trust(tmp_path, capsys):
    path = tmp_path / "features.ts"
    torch.jit.save(torch.jit.script(Pooled()), str(path))
    _fails(capsys, _eval(tmp_path, "--ckpt", DEFAULT, "--features", str(path)), "--trust-code")
    features, _ = metrics.network_extractor(path, trust_code=True)(torch.zeros(2, 3, 16, 16))
    assert features.shape == (2, 4)


def test_model_of_another_sample_shape_is_refused(tmp_path, capsys):
    """An 8×8 shapes model was scored against the 16×16 reference (item 8)."""
    torch.manual_seed(0)
    net = UNet(preset("tiny", num_classes=3, image_size=8))
    dataset = {"name": "shapes", "class_names": ["a", "b", "c"], "shape": [3, 8, 8]}
    small = checkpoint.save_ema_weights(net.state_dict(), checkpoint.config_dict(net.config),
                                        dataset, tmp_path / "small.safetensors")
    _fails(capsys, _eval(tmp_path, "--ckpt", str(small)), "(3, 8, 8)", "(3, 16, 16)")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("features", ["digits-classifier", "wrong-network"])
def test_wrong_feature_network_is_one_line(tmp_path, capsys, features):
    """The digits classifier or a network for other images as features crashed (item 9)."""
    if features == "digits-classifier":
        path = ASSETS / "classifier-digits.safetensors"
    else:
        path = tmp_path / "wrong.pt2"
        flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
        torch.export.save(torch.export.export(flat, (torch.zeros(2, 3, 8, 8),)), path)
    _fails(capsys, _eval(tmp_path, "--ckpt", DEFAULT, "--features", str(path)),
           "cannot score images of shape (3, 16, 16)")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--batch-size", "0"),
                                         ("--holdout", "nan"), ("--heldout-size", "0"),
                                         ("--lr", "inf"), ("--data", "")])
def test_classifier_training_flags_are_checked_first(tmp_path, capsys, flag, value):
    """steps 0, batch 0, holdout nan and held-out size 0 ("accuracy nan") used to run (item 10)."""
    out = tmp_path / "c.safetensors"
    _fails(capsys, ["train-classifier", "--data", "gmm", flag, value, "--out", str(out)],
           flag.lstrip("-"))
    assert not out.exists()


def test_classifier_output_is_checked_before_training(tmp_path, capsys):
    _fails(capsys, ["train-classifier", "--data", "gmm", "--steps", "1", "--out",
                    str(tmp_path / "missing" / "c.safetensors")], "does not exist")
