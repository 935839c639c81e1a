"""Guidance distillation (Meng et al. 2023, stage one): the w-embedded student's forward, its
zero-initialised start (exactly the teacher's conditional ε for every w), learning the teacher's
guided ε̃_w = (1+w)·ε(z, c) − w·ε(z, ∅), bit-identical resume, and the CLI's one-line errors."""
from dataclasses import replace

import pytest
import torch

from cfgengine import checkpoint, load
from cfgengine.data import load_dataset
from cfgengine.distill import (DistillConfig, distill, distill_step, guidance_error, guided_target,
                               new_state, resume, student_of)
from cfgengine.train import TrainConfig, train_step
from cfgengine.train import new_state as new_train_state
from cfgengine.unet import UNet, preset

from tests.conftest import cli_fails

CPU = torch.device("cpu")


def _batch(n: int, num_classes: int, shape=(3, 16, 16), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *shape), generator=gen)
    logsnr = torch.empty(n).uniform_(-6, 6, generator=gen)
    labels = torch.randint(num_classes + 1, (n,), generator=gen)
    w = torch.empty(n).uniform_(0, 8, generator=gen)
    return z, logsnr, labels, w


def test_student_forward_takes_w_per_row():
    """A w-embedded UNet maps (z [N, C, H, W], λ [N], labels [N], w [N]) to ε shaped like z, and w
    changes it once trained (here: every weight random, the zero-initialised layers included)."""
    torch.manual_seed(0)
    student = UNet(preset("tiny", guidance_embedding=True)).eval()
    assert student.guidance_embedded
    for p in student.parameters():
        torch.nn.init.normal_(p, std=0.2)
    z, logsnr, labels, w = _batch(4, student.num_classes)
    with torch.no_grad():
        eps = student(z, logsnr, labels, w)
        other = student(z, logsnr, labels, w + 1)
    assert eps.shape == z.shape and eps.dtype == z.dtype
    assert not torch.allclose(eps, other)
    with pytest.raises(ValueError, match="takes w per row"):
        student(z, logsnr, labels)


def test_plain_unet_is_unchanged():
    """Without the flag: no w embedding in the state dict, no guidance_embedded, w refused."""
    plain = UNet(preset("tiny"))
    assert not plain.guidance_embedded
    assert not any(k.startswith("guidance_embed") for k in plain.state_dict())
    z, logsnr, labels, w = _batch(2, plain.num_classes)
    with pytest.raises(ValueError, match="takes no w"):
        plain(z, logsnr, labels, w)


def test_student_starts_as_the_teachers_conditional_eps():
    """student_of(default)(z, λ, c, w) == default(z, λ, c) bit for bit for any w (and c = ∅): the
    w embedding's last layer is zero, so distillation starts from the teacher."""
    teacher = load("default")
    student = student_of(teacher).eval()
    assert student.guidance_embedded and student.dataset == teacher.dataset
    z, logsnr, labels, w = _batch(6, teacher.num_classes)
    with torch.no_grad():
        expected = teacher(z, logsnr, labels)
        for scale in (0.0, 1.0, 100.0):
            assert torch.equal(student(z, logsnr, labels, scale * w), expected)


def test_guided_target_is_one_doubled_forward(recorder, gmm):
    """ε̃_w = (1+w)·ε(z, c) − w·ε(z, ∅) per row, from one call on 2N rows (c rows then ∅ rows)."""
    net = recorder(gmm)
    z = torch.randn(5, 2)
    logsnr, labels, w = torch.linspace(-3, 3, 5), torch.tensor([0, 1, 2, 3, 4]), torch.rand(5) * 4
    target = guided_target(net, z, logsnr, labels, w)
    assert len(net.calls) == 1 and net.calls[0][0] == 10
    assert torch.equal(net.calls[0][1], torch.cat([labels, torch.full_like(labels, 5)]))
    null = torch.full_like(labels, gmm.num_classes)
    eps_c, eps_u = gmm(z.double(), logsnr, labels), gmm(z.double(), logsnr, null)
    expected = eps_c + w.double()[:, None] * (eps_c - eps_u)
    torch.testing.assert_close(target.double(), expected, atol=1e-6, rtol=1e-6)


def test_default_distilled_is_the_default_models_student():
    """The shipped `default-distilled` (≤ 10 MB) is `default`'s architecture plus the w embedding,
    and on held-out examples its error to default's guided ε̃_w is a small fraction of ε̃_w itself
    and well below the w-blind start's (scripts/distill_check.py prints the full table)."""
    from cfgengine.checkpoint import ASSETS

    assert (ASSETS / "default-distilled.safetensors").stat().st_size <= 10e6
    student, teacher = load("default-distilled"), load("default")
    assert student.guidance_embedded and student.dataset == teacher.dataset
    assert replace(student.config, guidance_embedding=False) == teacher.config
    rows = guidance_error(student, teacher, load_dataset("shapes"), [0.3, 1.0, 2.0, 4.0], n=96)
    assert all(row["relative"] < 0.02 for row in rows), rows
    assert all(row["vs_blind"] < 0.5 for row in rows if row["w"] >= 1), rows


@pytest.fixture(scope="module")
def gmm_teacher():
    """A tiny UNet trained 60 steps on `gmm` (images of a Gaussian mixture): a teacher whose
    guidance direction ε(z, c) − ε(z, ∅) is far from zero."""
    config = TrainConfig(data="gmm", preset="tiny", batch_size=64, lr=3e-3, warmup=20,
                         out="unused")
    dataset = load_dataset("gmm")
    state = new_train_state(config, dataset, CPU)
    for _ in range(60):
        train_step(state, dataset, config, CPU)
    teacher = state.ema.eval()
    teacher.class_names, teacher.dataset = dataset.class_names, "gmm"
    return teacher, dataset


def test_distillation_learns_the_guided_eps(gmm_teacher, tmp_path):
    """The student starts as the w-blind ε_T(z, c), whose error to ε̃_w is exactly
    w²·‖ε_T(z, c) − ε_T(z, ∅)‖²; 60 distillation steps must cut the error, summed over
    w ∈ {1, 2, 4} on held-out examples, below half of that (measured: 0.21 of it)."""
    teacher, dataset = gmm_teacher
    config = DistillConfig(out=str(tmp_path / "s.safetensors"), batch_size=64, lr=1e-3,
                           warmup=10, p_uncond=0.1)
    state = new_state(config, teacher, CPU)
    ws = [1.0, 2.0, 4.0]
    start = guidance_error(state.model, teacher, dataset, ws)
    assert all(row["vs_blind"] == pytest.approx(1.0) for row in start)
    for _ in range(60):
        distill_step(state, dataset, CPU)
    end = guidance_error(state.model.eval(), teacher, dataset, ws)
    blind = sum(row["mse"] for row in start)
    assert sum(row["mse"] for row in end) < 0.5 * blind, (end, start)


def _saved_teacher(gmm_teacher, path):
    teacher, dataset = gmm_teacher
    checkpoint.save_ema_weights(teacher.state_dict(), checkpoint.config_dict(teacher.config),
                                checkpoint.dataset_dict(dataset.info), path)
    return str(path)


def test_resume_equals_uninterrupted(gmm_teacher, tmp_path):
    """4 steps straight == 2 steps, then --resume to 4 (model, EMA, optimizer, RNG); the written
    student loads back through cfgengine.load as a guidance-embedded UNet."""
    teacher = _saved_teacher(gmm_teacher, tmp_path / "teacher.safetensors")
    base = DistillConfig(teacher=teacher, batch_size=8, ckpt_every=2, seed=3)
    whole = distill(replace(base, out=str(tmp_path / "a.safetensors"), steps=4))
    distill(replace(base, out=str(tmp_path / "b.safetensors"), steps=2))
    (tmp_path / "teacher.safetensors").unlink()  # the checkpoint carries the teacher
    resumed = resume(tmp_path / "b.ckpt.pt", steps=4)
    assert resumed.step == whole.step == 4
    for a, b in ((whole.model, resumed.model), (whole.ema, resumed.ema)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    assert whole.config.p_uncond == resumed.config.p_uncond == 0.1
    student = load(tmp_path / "b.safetensors")
    assert student.guidance_embedded and student.config.guidance_embedding
    for x, y in zip(student.state_dict().values(), whole.ema.state_dict().values()):
        assert torch.equal(x, y)


def test_teacher_p_uncond_comes_from_its_checkpoint(tmp_path):
    """A ckpt.pt teacher's recorded p_uncond is the distillation's default."""
    from cfgengine.train import train

    run = tmp_path / "run"
    train(TrainConfig(data="gmm", preset="tiny", steps=1, batch_size=4, p_uncond=0.3,
                      out=str(run), ckpt_every=1, sample_every=1000))
    state = distill(DistillConfig(teacher=str(run / "ckpt.pt"), steps=1, batch_size=4,
                                  out=str(tmp_path / "s.safetensors")))
    assert state.config.p_uncond == 0.3
    with pytest.raises(ValueError, match="not a distillation checkpoint"):
        resume(run / "ckpt.pt")
    with pytest.raises(ValueError, match="keeps the checkpoint's --batch, --w-max"):
        resume(tmp_path / "s.ckpt.pt", batch_size=8, w_max=2.0)


def test_cli_distills(gmm_teacher, tmp_path, capsys):
    from cfgengine.cli import main

    teacher = _saved_teacher(gmm_teacher, tmp_path / "teacher.safetensors")
    out = tmp_path / "student.safetensors"
    assert main(["distill", "--teacher", teacher, "--out", str(out), "--iters", "2",
                 "--batch", "4", "--w-max", "2"]) == 0
    assert "distilled to step 2" in capsys.readouterr().out
    assert load(out).guidance_embedded


def test_cli_errors_are_one_line(gmm_teacher, tmp_path, capsys):
    """Bad teacher file, w_max ≤ 0, unwritable or clashing outputs: one line, exit 2, nothing
    written."""
    out = str(tmp_path / "s.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a model")
    cli_fails(capsys, ["distill", "--teacher", str(junk), "--out", out], "junk.safetensors")
    cli_fails(capsys, ["distill", "--teacher", str(tmp_path / "none.pt"), "--out", out],
              "no such")
    cli_fails(capsys, ["distill", "--teacher", "gmm", "--out", out], "UNet")
    teacher = _saved_teacher(gmm_teacher, tmp_path / "teacher.safetensors")
    for w_max in ("0", "-1", "nan"):
        cli_fails(capsys, ["distill", "--teacher", teacher, "--out", out, "--w-max", w_max],
                  "--w-max")
    cli_fails(capsys, ["distill", "--teacher", teacher, "--out", str(tmp_path)], "--out")
    cli_fails(capsys, ["distill", "--teacher", teacher, "--out", str(tmp_path / "s.pt")],
              ".safetensors")
    cli_fails(capsys, ["distill", "--teacher", teacher, "--out",
                       str(tmp_path / "missing" / "s.safetensors")], "does not exist")
    cli_fails(capsys, ["distill", "--teacher", teacher, "--out", teacher], "same file")
    cli_fails(capsys, ["distill", "--resume", teacher], "not a cfgengine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors",
                                                          "teacher.safetensors"]
