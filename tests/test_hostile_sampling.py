"""Issue 14, sampling as a hostile user would drive it (items 2, 5, 9, 11, 12): outputs never
destroy inputs or non-files, wrong or non-finite network outputs are errors, impossible requests
are refused before allocating, and any row of a run can be regenerated alone."""
from __future__ import annotations

import os
import shutil
import stat
import warnings

import numpy as np
import pytest
import torch

import cfgengine
from tests.conftest import cli_fails as _fails
from cfgengine import cli, registry
from cfgengine.checkpoint import ASSETS

GMM = ["sample", "--ckpt", "gmm", "--steps", "4", "--n", "3"]




class Wrapped:
    """A Denoiser around gmm whose output `change(eps, call)` edits (call counts from 0)."""

    def __init__(self, inner, change):
        self.inner, self.change, self.calls = inner, change, 0
        self.num_classes, self.sample_shape = inner.num_classes, inner.sample_shape
        self.clip = 1.0

    def __call__(self, z, logsnr, labels):
        eps = self.change(self.inner(z, logsnr, labels), self.calls)
        self.calls += 1
        return eps


# ---------------------------------------------------------------------------------------------
# Item 2: outputs

def test_out_equal_to_the_model_file_is_refused(tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    shutil.copy(ASSETS / "default.safetensors", model)
    before = model.read_bytes()
    _fails(capsys, ["sample", "--ckpt", str(model), "--out", str(model), "--steps", "2"],
           "same file")
    assert model.read_bytes() == before


def test_npz_equal_to_out_is_refused(tmp_path, capsys):
    out = tmp_path / "x.png"
    _fails(capsys, [*GMM, "--out", str(out), "--npz", str(out)], "same file")
    assert not out.exists()


def test_symlinked_output_is_written_through(tmp_path, capsys):
    target = tmp_path / "real" / "x.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    assert cli.main([*GMM, "--out", str(link)]) == 0
    assert link.is_symlink() and target.read_bytes()[:4] == b"\x89PNG"


def test_non_regular_output_is_refused(tmp_path, capsys):
    """As root, `--out /dev/null` replaced /dev/null by a regular file; a FIFO shows the same
    without risking the machine's /dev/null."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    _fails(capsys, [*GMM, "--out", str(fifo)], "not a regular file")
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_outputs_get_the_users_umask(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert cli.main([*GMM, "--out", str(tmp_path / "x.png"),
                         "--npz", str(tmp_path / "x.npz")]) == 0
    finally:
        os.umask(old)
    for name in ("x.png", "x.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644  # mkstemp alone: 0o600


# ---------------------------------------------------------------------------------------------
# Item 5: wrong row count, non-finite network output

def test_b_rows_where_2b_are_due_is_an_error(gmm):
    """With B rows, w = 4 gave exactly the w = 0 samples: guidance silently vanished."""
    half = Wrapped(gmm, lambda eps, call: eps[: eps.shape[0] // 2])
    labels = torch.arange(5)
    with pytest.raises(ValueError, match="Wrapped: returned 5 rows where 10 are due"):
        cfgengine.sample(half, labels, w=4.0, steps=4)


@pytest.mark.parametrize("bad_steps, w", [((1, 2), 4.0), ((0, 1, 2, 3, 4, 5, 6, 7), 0.0)])
def test_inf_from_the_network_is_reported_not_clipped(gmm, bad_steps, w):
    """±inf early (or at every step with w = 0) was clamped into normal-looking samples."""
    steps = 8
    net = Wrapped(gmm, lambda eps, call: eps * torch.inf if call in bad_steps else eps)
    # from the first bad step on, z itself is NaN, so every later output is too
    with pytest.raises(FloatingPointError, match=rf"steps {bad_steps[0]}\.\.{steps - 1} of "
                                                 rf"{steps} \(precision fp32\)"):
        cfgengine.sample(net, torch.arange(5), w=w, steps=steps, clip=1.0)


def test_inf_from_the_network_is_one_line_in_the_cli(gmm, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.BUILTINS, "inf-net",
                        lambda: Wrapped(gmm, lambda eps, call: eps * torch.inf))
    _fails(capsys, ["sample", "--ckpt", "inf-net", "--steps", "4", "--n", "1",
                    "--out", str(tmp_path / "x.png")], "NaN/inf")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# Item 9: impossible requests are refused before allocating

@pytest.mark.parametrize("argv, mention", [
    (["sample", "--ckpt", "gmm", "--steps", "1000000000000"], "--steps"),
    (["sample", "--n", "10000000"], "--n"),
    (["classifier-accuracy", "--n", "100000000"], "--n"),
    (["classifier-accuracy", "--n", "0"], "--n"),
    (["bench", "--threads", "100000"], "--threads"),
    (["bench", "--name", "../../x"], "--name"),
])
def test_crash_flags_are_one_line(argv, mention, capsys, tmp_path):
    out = ["--out", str(tmp_path / "x.png")] if argv[0] == "sample" else []
    _fails(capsys, [*argv, *out], mention)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_cuda_export_on_a_cpu_torch_is_one_line(capsys, tmp_path):
    _fails(capsys, ["export", "default", "--format", "aoti", "--device", "cuda",
                    "-o", str(tmp_path / "x.pt2")], "CUDA")


def test_npz_with_huge_labels_is_refused(tmp_path, capsys):
    data = tmp_path / "evil.npz"
    np.savez(data, x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 2, 10**9]))
    _fails(capsys, ["train", "--data", str(data), "--preset", "tiny", "--steps", "1",
                    "--out", str(tmp_path / "run")], "labels go up to 1000000000")


# ---------------------------------------------------------------------------------------------
# Item 11: messages

def test_numpy_integer_seeds_are_integers(gmm):
    labels = torch.arange(5)
    assert torch.equal(cfgengine.sample(gmm, labels, steps=4, seed=np.int64(3)),
                       cfgengine.sample(gmm, labels, steps=4, seed=3))


def test_huge_seed_is_a_range_message(capsys, tmp_path):
    err = _fails(capsys, [*GMM, "--seed", "99999999999999999999",
                          "--out", str(tmp_path / "x.png")], "seed")
    assert "Overflow" not in err


def test_library_warnings_add_no_stderr_lines(capsys, tmp_path, monkeypatch):
    original = registry.load

    def noisy_load(*args, **kwargs):
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning,
                               "torch/utils/_pytree.py", 1, module="torch.utils._pytree")
        return original(*args, **kwargs)

    monkeypatch.setattr("cfgengine.cli.sample.load", noisy_load)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main([*GMM, "--out", str(tmp_path / "x.png")]) == 0
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# Item 12: sample_ids

def test_one_row_of_a_run_is_regenerated_alone(gmm):
    labels = torch.arange(5).repeat(8)  # 40 rows
    w = torch.linspace(0, 2, 40)
    run = cfgengine.sample(gmm, labels, w=w, steps=6, seed=11)
    for k in (0, 13, 39):
        alone = cfgengine.sample(gmm, labels[k:k + 1], w=w[k:k + 1], steps=6, seed=11,
                                 sample_ids=torch.tensor([k]))
        torch.testing.assert_close(alone[0], run[k], rtol=0, atol=1e-6)
    shuffled = torch.tensor([39, 13, 0])
    torch.testing.assert_close(
        cfgengine.sample(gmm, labels[shuffled], w=w[shuffled], steps=6, seed=11,
                         sample_ids=shuffled), run[shuffled], rtol=0, atol=1e-6)


@pytest.mark.parametrize("ids, message", [(torch.tensor([0.5]), "integer"),
                                          (torch.tensor([1, 2]), "2 entries for 1"),
                                          (torch.tensor([-1]), "≥ 0")])
def test_bad_sample_ids(gmm, ids, message):
    with pytest.raises(ValueError, match=message):
        cfgengine.sample(gmm, torch.tensor([0]), steps=4, sample_ids=ids)


def test_cli_first_id_regenerates_a_row(tmp_path, capsys):
    big, one = tmp_path / "big.npz", tmp_path / "one.npz"
    assert cli.main(["sample", "--ckpt", "gmm", "--steps", "4", "--n", "6", "--seed", "5",
                     "--out", str(tmp_path / "big.png"), "--npz", str(big)]) == 0
    k = 15  # class 2 (rows are n per class, class order), third sample
    assert cli.main(["sample", "--ckpt", "gmm", "--steps", "4", "--n", "1", "--classes", "2",
                     "--seed", "5", "--first-id", str(k), "--out", str(tmp_path / "one.png"),
                     "--npz", str(one)]) == 0
    with np.load(big) as a, np.load(one) as b:
        assert a["labels"][k] == b["labels"][0] == 2
        np.testing.assert_allclose(b["arr_0"][0], a["arr_0"][k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Issue 24 item 21: the budget comes before any allocation; λ ranges a schedule can represent.

def test_huge_per_class_is_refused_before_the_labels_are_allocated(capsys, monkeypatch):
    """--per-class 1e9 built a 64 GB label tensor (and a traceback) before the budget check."""
    def allocate(*args, **kwargs):
        pytest.fail("rows allocated before the memory budget check")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", allocate)
    _fails(capsys, ["sample", "--ckpt", "gmm", "--steps", "2", "--classes", "0",
                    "--per-class", str(10**9)], "1000000000 samples", "lower --per-class")


@pytest.mark.parametrize("bad", ["-2000,20", "-20,90", "-81,0"])
def test_logsnr_range_beyond_float_schedules_is_one_line(capsys, tmp_path, gmm, bad):
    """-2000,20 overflowed math.exp: a traceback from the CLI and from the API."""
    _fails(capsys, GMM + [f"--logsnr-range={bad}", "--out", str(tmp_path / "x.png")],
           "is outside [-80, 80]", "float32")
    lo, hi = map(float, bad.split(","))
    with pytest.raises(ValueError, match=r"outside \[-80, 80\]"):
        cfgengine.sample(gmm, torch.tensor([0]), steps=2, logsnr_range=(lo, hi))
    with pytest.raises(ValueError, match=r"outside \[-80, 80\]"):
        cfgengine.sample(gmm, torch.tensor([0]), logsnr=torch.linspace(lo, hi, 3,
                                                                       dtype=torch.float64))
    assert not (tmp_path / "x.png").exists()
