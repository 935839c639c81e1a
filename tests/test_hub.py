"""Hub ids as people type them (cfgengine/hub.py): `cfgengine.load("org/name")` and
`--ckpt org/name` through huggingface_hub's own cache lookup, on a cache folder laid out here in
the hub's format (models--org--name/{refs/main, snapshots/<commit>/…}); nothing is downloaded."""
from __future__ import annotations

import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import cfgengine  # noqa: E402
from cfgengine.adapters import DiffusersDenoiser  # noqa: E402
from cfgengine.cli import main  # noqa: E402
from tests.test_adapters import tiny_unet  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A cache holding org/tiny-unet, offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-unet"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler()) \
        .save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "org/tiny-unet" is no local path here
    return cache


def test_a_cached_hub_id_loads_offline(hub_cache):
    model = cfgengine.load("org/tiny-unet")
    assert isinstance(model, DiffusersDenoiser) and model.num_classes == 4
    out = cfgengine.sample(model, torch.tensor([0, 3]), w=1.0, steps=3, sampler="ddim",
                           backend="torch")
    assert out.shape == (2, 3, 8, 8)


def test_the_cli_takes_a_hub_id(hub_cache, tmp_path):
    npz = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", "org/tiny-unet", "--steps", "3", "--sampler", "ddim",
                 "--n", "1", "--npz", str(npz), "--backend", "torch",
                 "--schedule", "pipeline"]) == 0
    assert npz.is_file()


def test_a_missing_hub_id_fails_in_one_line(hub_cache, capsys):
    with pytest.raises(ValueError, match=r"org/absent: not a local path, and not in the Hugging "
                                         r"Face cache .*HF_HUB_OFFLINE is set"):
        cfgengine.load("org/absent")
    shutil.rmtree(hub_cache / "models--org--tiny-unet" / "snapshots")  # refs without files
    assert main(["sample", "--ckpt", "org/tiny-unet", "--steps", "3", "--n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "org/tiny-unet" in err and len(err.splitlines()) == 1, err
