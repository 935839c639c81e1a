"""Issue 14, training as a hostile user would drive it (items 2, 3, 4, 6, 9, 10): outputs never
destroy inputs, resume stays beside its checkpoint, Ctrl-C resumes bit-identically, non-finite
training stops with the last good checkpoint, and every flag is checked before any work."""
from __future__ import annotations

import os
import resource
import shutil
import signal

import pytest
import torch

from cfgengine import checkpoint
from cfgengine import train as train_module
from cfgengine.cli import main
from cfgengine.train import TrainConfig, resume, train

TINY = dict(data="gmm", preset="tiny", batch_size=8, ckpt_every=1000, sample_every=1000)
CLI_TINY = ["train", "--data", "gmm", "--preset", "tiny", "--batch-size", "8"]


def _state(path):
    contents = checkpoint.read_checkpoint(path)
    flat = {f"model.{k}": v for k, v in contents["model"].items()}
    flat.update({f"ema.{k}": v for k, v in contents["ema"].items()})
    flat.update({f"rng.{k}": v for k, v in contents["rng"].items()})
    flat["step"] = contents["step"]
    return flat


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor)
                                   else a[k] == b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _fails(capsys, argv, *mentions):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cfgengine: error: ") and err.count("\n") == 1, err
    for word in mentions:
        assert word in err, err
    return err


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run: the reference of every resume below."""
    out = tmp_path_factory.mktemp("straight")
    train(TrainConfig(**TINY, steps=6, out=str(out)))
    return _state(out / "ckpt.pt")


def test_four_sigint_resume_cycles_equal_an_uninterrupted_run(tmp_path, monkeypatch, straight):
    """SIGINT arrives mid-step (after the batch and noise were drawn): the checkpoint must hold
    the last completed step, not RNG states advanced into the next one (item 4)."""
    original = train_module.diffusion_loss
    calls = {"n": 0}

    def loss_then_sigint(*args):
        loss = original(*args)
        calls["n"] += 1
        if calls["n"] in (1, 3, 4, 5):  # stops after steps 1, 3, 4, 5
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of train_step
        return loss

    monkeypatch.setattr(train_module, "diffusion_loss", loss_then_sigint)
    out = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**TINY, steps=6, out=str(out)))
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            resume(out / "ckpt.pt")
    monkeypatch.setattr(train_module, "diffusion_loss", original)
    assert checkpoint.read_checkpoint(out / "ckpt.pt")["step"] == 5
    resume(out / "ckpt.pt")
    _assert_identical(straight, _state(out / "ckpt.pt"))


def test_resume_continues_beside_the_given_checkpoint(tmp_path, straight):
    """A moved run folder resumes where it now is; the original is never touched (item 3)."""
    original = tmp_path / "original"
    train(TrainConfig(**TINY, steps=3, out=str(original)))
    moved = tmp_path / "moved"
    shutil.copytree(original, moved)
    shutil.rmtree(original)
    resume(moved / "ckpt.pt", steps=6)
    assert not original.exists()
    assert (moved / "model.safetensors").is_file()
    _assert_identical(straight, _state(moved / "ckpt.pt"))


def test_export_onto_the_resumed_checkpoint_is_refused(tmp_path, capsys):
    """`train --resume run/ckpt.pt --export run/ckpt.pt` destroyed the checkpoint (item 2)."""
    run = tmp_path / "run"
    train(TrainConfig(**TINY, steps=1, out=str(run)))
    before = (run / "ckpt.pt").read_bytes()
    _fails(capsys, ["train", "--resume", str(run / "ckpt.pt"), "--steps", "2",
                    "--export", str(run / "ckpt.pt")], "same file")
    assert (run / "ckpt.pt").read_bytes() == before
    link = tmp_path / "link.pt"
    link.symlink_to(run / "ckpt.pt")
    _fails(capsys, [*CLI_TINY, "--steps", "1", "--out", str(run), "--export", str(link)],
           "same file")
    assert (run / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--grad-clip", "nan"),
                                         ("--lr", "nan"), ("--sample-w", "nan"),
                                         ("--image-size", "0"), ("--data", ""),
                                         ("--seed", "99999999999999999999"),
                                         ("--device", "cuda:7" if torch.cuda.is_available()
                                          else "cuda")])
def test_bad_training_flags_fail_before_any_work(tmp_path, capsys, flag, value):
    """Items 6, 9, 10, 11: each used to train (to NaN), crash, or fail after a checkpoint."""
    out = tmp_path / "run"
    _fails(capsys, [*CLI_TINY, "--steps", "2", "--out", str(out), flag, value], flag.lstrip("-"))
    assert not out.exists()


def test_unwritable_outputs_fail_before_training(tmp_path, capsys):
    """--export DIR and an unwritable run folder used to fail only after training (item 10)."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    _fails(capsys, [*CLI_TINY, "--steps", "1", "--out", str(tmp_path / "r"), "--export",
                    str(folder)], "directory")
    assert not (tmp_path / "r").exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not bind")
        _fails(capsys, [*CLI_TINY, "--steps", "1", "--out", str(locked / "run")], "not writable")
    finally:
        locked.chmod(0o700)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """A finite but absurd learning rate drives the loss to inf/NaN: exit 2, one line naming the
    step range; the checkpoint on disk is the last one whose weights are finite (item 6)."""
    out = tmp_path / "run"
    _fails(capsys, [*CLI_TINY, "--steps", "20", "--lr", "1e30", "--warmup", "0",
                    "--ckpt-every", "1", "--out", str(out)], "NaN/inf", "between steps")
    kept = checkpoint.read_checkpoint(out / "ckpt.pt")
    assert 1 <= kept["step"] < 20
    assert all(bool(torch.isfinite(t).all()) for t in kept["ema"].values())
    assert not (out / "model.safetensors").exists()


def test_disk_full_during_checkpoint_is_one_line_and_keeps_the_old_file(tmp_path, capsys):
    """A real short write (RLIMIT_FSIZE, EFBIG) used to end in torch's "unexpected pos" (item 9)."""
    run = tmp_path / "run"
    train(TrainConfig(**TINY, steps=1, out=str(run)))
    before = (run / "ckpt.pt").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        code = main(["train", "--resume", str(run / "ckpt.pt"), "--steps", "2"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert code == 2
    err = capsys.readouterr().err
    assert "could not write the checkpoint" in err and err.count("\n") == 1, err
    assert (run / "ckpt.pt").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt", "model.safetensors"]


def test_checkpoint_missing_keys_and_mistyped_metadata(tmp_path, capsys):
    """A ckpt.pt without keys (KeyError) and safetensors metadata of the wrong JSON type
    (AttributeError / IndexError) used to crash (item 9)."""
    run = tmp_path / "run"
    train(TrainConfig(**TINY, steps=1, out=str(run)))
    contents = checkpoint.read_checkpoint(run / "ckpt.pt")
    for key in ("ema", "rng", "model_config"):
        broken = tmp_path / f"no-{key}.pt"
        torch.save({k: v for k, v in contents.items() if k != key}, broken)
        _fails(capsys, ["train", "--resume", str(broken)], key)
        if key == "rng":
            continue  # sampling needs only the model
        _fails(capsys, ["sample", "--ckpt", str(broken), "--steps", "2",
                        "--out", str(tmp_path / "x.png")], "lacks")
    ema = contents["ema"]
    for meta in ({"model_config": [1, 2], "dataset": {}},
                 {"model_config": contents["model_config"], "dataset": "shapes"},
                 {"model_config": contents["model_config"], "dataset": {"class_names": 7}},
                 {"model_config": {"channels": "x"}, "dataset": {}}):
        path = checkpoint.write_safetensors(ema, tmp_path / "m.safetensors",
                                            checkpoint.EMA_FORMAT, **meta)
        _fails(capsys, ["sample", "--ckpt", str(path), "--steps", "2",
                        "--out", str(tmp_path / "x.png")], str(path))
