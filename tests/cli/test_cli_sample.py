"""`cfgengine sample` end to end (in-process via `cli.main`, once as the console script): outputs
against the Python API, and the edge contract — a user error is one line on stderr, exit code 2,
no traceback, no output file (docs/design.md §3)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cfgengine
from cfgengine import cli

SWEEP = ["sample", "--ckpt", "gmm", "--w", "0,0.3,1", "--steps", "8", "--n", "20"]
K = 5  # classes of the gmm built-in


def run_cli(capsys, *args: str):
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One in-process `--w 0,0.3,1` run, shared: (exit code, stdout, stderr, png, npz)."""
    out = tmp_path_factory.mktemp("sweep")
    png, npz = out / "X.png", out / "X.npz"
    with pytest.MonkeyPatch.context() as patch:
        stdout, stderr = _Capture(), _Capture()
        patch.setattr(sys, "stdout", stdout)
        patch.setattr(sys, "stderr", stderr)
        code = cli.main([*SWEEP, "--out", str(png), "--npz", str(npz)])
    return code, stdout.getvalue(), stderr.getvalue(), png, npz


class _Capture:
    """A minimal text stream (module-scoped fixtures cannot use capsys)."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        return "".join(self.parts)


def test_sweep_exits_zero_with_one_summary_line(sweep):
    code, stdout, stderr, png, _ = sweep
    assert code == 0 and stderr == ""
    lines = stdout.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(rf"300 samples, 8 steps, .* -> {re.escape(str(png))}", lines[0])


def test_sweep_png_is_valid_and_has_one_panel_per_w(sweep, tmp_path, capsys):
    png = sweep[3]
    with Image.open(png) as image:
        image.verify()
    single = tmp_path / "one.png"
    code, _, _ = run_cli(capsys, "sample", "--ckpt", "gmm", "--w", "0.3", "--steps", "8",
                         "--n", "20", "--out", str(single))
    assert code == 0
    with Image.open(png) as three, Image.open(single) as one:
        assert three.format == one.format == "PNG"
        assert three.width > 2.5 * one.width
        assert abs(three.height - one.height) <= 2


def test_sweep_npz_has_samples_labels_and_w_in_order(sweep):
    with np.load(sweep[4]) as data:
        assert set(data.files) == {"arr_0", "labels", "w"}
        arr, labels, w = data["arr_0"], data["labels"], data["w"]
    assert arr.shape == (300, 2) and labels.shape == (300,)
    block = np.repeat(np.arange(K), 20)  # one block of n rows per class, in class order
    np.testing.assert_array_equal(labels, np.tile(block, 3))  # then once per w
    np.testing.assert_allclose(w, [0.0, 0.3, 1.0])


def test_flags_reach_the_sampler_and_rows_follow_w_then_class(tmp_path, capsys):
    npz = tmp_path / "c.npz"
    code, _, err = run_cli(capsys, "sample", "--ckpt", "gmm", "--classes", "3,1", "--n", "3",
                           "--w", "2,0.3", "--steps", "4", "--batch", "5", "--seed", "9",
                           "--sampler", "ddim", "--eta", "0.5",
                           "--out", str(tmp_path / "c.png"), "--npz", str(npz))
    assert code == 0 and err == ""
    labels = torch.tensor([3, 3, 3, 1, 1, 1] * 2)
    w = torch.tensor([2.0] * 6 + [0.3] * 6)
    ref = cfgengine.sample(cfgengine.load("gmm"), labels, w=w, steps=4, seed=9, sampler="ddim",
                           eta=0.5)
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["labels"], labels.numpy())
        np.testing.assert_allclose(data["w"], [2.0, 0.3])
        torch.testing.assert_close(torch.from_numpy(data["arr_0"]), ref, rtol=1e-5, atol=1e-5)


def test_console_script_runs_the_sweep(tmp_path, sweep):
    script = Path(sys.executable).with_name("cfgengine")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    png, npz = tmp_path / "X.png", tmp_path / "X.npz"
    result = subprocess.run([str(script), *SWEEP, "--out", str(png), "--npz", str(npz)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 and "300 samples" in result.stdout
    with Image.open(png) as image:
        image.verify()
    with np.load(npz) as got, np.load(sweep[4]) as in_process:
        for name in ("arr_0", "labels", "w"):
            np.testing.assert_array_equal(got[name], in_process[name])


# --------------------------------------------------------------------------------------------
# User errors: exit 2, one line `cfgengine: error: …`, no traceback, nothing written.

BAD_FLAGS = [
    (["--w", "abc"], "--w"),
    (["--w", "nan"], "--w"),
    (["--w", "0.3,inf"], "--w"),
    (["--steps", "1"], "steps"),
    (["--steps", "x"], "--steps"),
    (["--v", "2"], "v"),
    (["--eta", "-1"], "eta"),
    (["--classes", "99"], "--classes"),
    (["--classes", "a"], "--classes"),
    (["--n", "0"], "--n"),
    (["--batch", "0"], "batch"),
    (["--seed", "-1"], "seed"),
    (["--ckpt", "nosuchfile"], "nosuchfile"),
    (["--out", "/nonexistent/dir/x.png"], "--out"),
    (["--npz", "/nonexistent/dir/x.npz"], "--npz"),
    (["--sampler", "foo"], "--sampler"),
    (["--precision", "fp8"], "--precision"),
    (["--no-such-flag"], "--no-such-flag"),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append((["--device", "cuda"], "cuda"))
    BAD_FLAGS.append((["--backend", "cudagraph"], "cudagraph"))
BAD_FLAGS += [(["--device", "foo"], "foo"), (["--backend", "foo"], "--backend")]
# Fixed bugs, kept as regressions: outputs that are directories, an empty class list, and a
# failing PNG write that must not leave the already-rendered --npz behind.
BAD_FLAGS += [(["--out", "{tmp}"], "--out"), (["--npz", "{tmp}"], "--npz"),
              (["--classes", ","], "--classes")]
if Path("/proc").is_dir():
    BAD_FLAGS.append((["--out", "/proc/x.png"], "x.png"))


def _ids(cases):
    return [case if isinstance(case, str) else " ".join(case[0]) for case in cases]


@pytest.mark.parametrize("flags, mentions", BAD_FLAGS,
                         ids=_ids(BAD_FLAGS))
def test_bad_flag_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, flags, mentions):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    outputs = ["--out", str(tmp_path / "x.png"), "--npz", str(tmp_path / "x.npz")]
    try:
        code = cli.main(["sample", "--ckpt", "gmm", "--steps", "4", "--n", "3", *outputs, *flags])
    except BaseException as err:  # noqa: BLE001 — any escape is the failure being tested
        pytest.fail(f"cli.main raised {type(err).__name__}: {err}")
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("cfgengine: error: ")
    assert mentions in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [[], ["sample", "--help"]])
def test_usage_paths_do_not_traceback(capsys, argv):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # --help exits 0 through argparse
        code = exit_.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert code == (2 if not argv else 0)
    if not argv:
        assert len(captured.err.splitlines()) == 1
        assert captured.err.startswith("cfgengine: error: ")
    if argv:
        assert "guidance weight w" in captured.out and "1 + w" in captured.out
