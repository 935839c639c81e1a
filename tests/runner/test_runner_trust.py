"""Issue 24 items 2, 3, 7, 18 and 19 for cfgengine-run: a package loads only when trusted (the
trust file of cfgengine/trust.py, or --trust-code), from a private copy of the bytes it hashed; a
shared or damaged trust file is refused; the label table must fit num_classes; outputs never
replace the package, each other, or a non-file; user errors are one line, exit 2."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat

import numpy as np
import pytest

from cfgengine import trust
from tests.export.test_hostile_artifacts import edit_aoti_num_classes
from tests.runner.test_runner import run

ARGS = ["--labels", "1,6", "--steps", "2", "--seed", "3"]


def _fails(done, *mentions) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.startswith("cfgengine-run: error: ") and done.stderr.count("\n") == 1, \
        done.stderr
    for word in mentions:
        assert word in done.stderr, done.stderr
    return done.stderr


@pytest.fixture
def own_trust(tmp_path, monkeypatch):
    """(trust file, private tmp folder) for one test: the runner inherits both through the
    environment."""
    config, scratch = tmp_path / "config", tmp_path / "scratch"
    config.mkdir(mode=0o700)
    scratch.mkdir()
    monkeypatch.setenv(trust.ENV, str(config / "trusted.json"))
    monkeypatch.setenv("TMPDIR", str(scratch))
    return config / "trusted.json", scratch


def test_untrusted_package_is_refused_and_trust_code_loads_it(runner_binary, runner_package,
                                                              tmp_path, own_trust):
    """cfgengine-run loaded any .pt2, with no trust check and no --trust-code."""
    trust_path, scratch = own_trust
    out = tmp_path / "x.npy"
    _fails(run(runner_binary, runner_package, *ARGS, "--out", out), "refusing to load",
           "--trust-code", str(trust_path))
    assert not out.exists()
    assert run(runner_binary, runner_package, *ARGS, "--out", out, "--trust-code").returncode == 0
    x = np.load(out)
    trust.record(runner_package)  # recorded (by Python's SHA-256): trusted without the flag
    assert run(runner_binary, runner_package, *ARGS, "--out", out).returncode == 0
    np.testing.assert_array_equal(np.load(out), x)
    assert list(scratch.iterdir()) == []  # the private copy is gone


def test_trust_is_by_the_bytes_the_runner_hashes(runner_binary, runner_package, tmp_path,
                                                 own_trust):
    """A trust file naming the package's path but another hash does not trust it: the runner
    hashes the bytes (its own SHA-256 equals hashlib's, or the recorded hash would not match)."""
    trust_path, _ = own_trust
    digest = hashlib.sha256(runner_package.read_bytes()).hexdigest()
    trust_path.write_text(json.dumps({digest[::-1]: str(runner_package)}))
    _fails(run(runner_binary, runner_package, *ARGS, "--out", tmp_path / "x.npy"),
           "refusing to load")
    trust_path.write_text(json.dumps({digest: "/elsewhere/m.pt2"}))
    assert run(runner_binary, runner_package, *ARGS, "--out", tmp_path / "x.npy").returncode == 0


@pytest.mark.parametrize("shared", ["file", "folder"])
def test_trust_file_others_may_write_is_refused(runner_binary, runner_package, tmp_path,
                                                own_trust, shared):
    trust_path, _ = own_trust
    trust.record(runner_package)
    (trust_path if shared == "file" else trust_path.parent).chmod(0o777 if shared == "folder"
                                                                  else 0o666)
    _fails(run(runner_binary, runner_package, *ARGS, "--out", tmp_path / "x.npy"),
           "refusing the trust file", "everyone may write")
    if shared == "folder":
        trust_path.parent.chmod(0o777 | stat.S_ISVTX)  # sticky, like /tmp: accepted
        assert run(runner_binary, runner_package, *ARGS,
                   "--out", tmp_path / "x.npy").returncode == 0


def test_damaged_trust_file_is_an_error(runner_binary, runner_package, tmp_path, own_trust):
    trust_path, _ = own_trust
    trust.record(runner_package)
    damaged = trust_path.read_text().replace(":", "", 1)
    trust_path.write_text(damaged)
    _fails(run(runner_binary, runner_package, *ARGS, "--out", tmp_path / "x.npy"),
           str(trust_path), "damaged trust file, not valid JSON")
    assert trust_path.read_text() == damaged


def test_num_classes_edited_down_is_refused(runner_binary, runner_package, tmp_path):
    """Metadata 4 classes, graph 8 + null: label 4 sampled as "null", exit 0."""
    edited = edit_aoti_num_classes(runner_package, tmp_path / "edited.pt2", 4)
    _fails(run(runner_binary, edited, "--labels", "1,3", "--steps", "2", "--trust-code",
               "--out", tmp_path / "x.npy"),
           "num_classes 4, but its label table has 9 rows", "re-export the model")
    assert not (tmp_path / "x.npy").exists()


def test_outputs_never_replace_the_package_or_each_other(runner_binary, runner_package,
                                                         tmp_path):
    """--out m.pt2 overwrote the package (6.1 MB -> 3200 B); --png X --out X kept one."""
    package = tmp_path / "m.pt2"
    shutil.copy(runner_package, package)
    os.link(package, tmp_path / "hard.pt2")
    (tmp_path / "link.npy").symlink_to(package)
    before = package.read_bytes()
    for out in (package, tmp_path / "hard.pt2", tmp_path / "link.npy", tmp_path / "." / "m.pt2"):
        _fails(run(runner_binary, package, *ARGS, "--out", out), "is the same file as MODEL")
    assert package.read_bytes() == before
    (tmp_path / "sub").mkdir()
    _fails(run(runner_binary, package, *ARGS, "--out", tmp_path / "g.png",
               "--png", tmp_path / "sub" / ".." / "g.png"), "is the same file as --out")
    assert not (tmp_path / "g.png").exists()


def test_fifo_output_stays_a_fifo(runner_binary, runner_package, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    _fails(run(runner_binary, runner_package, *ARGS, "--out", fifo), "not a regular file")
    _fails(run(runner_binary, runner_package, *ARGS, "--out", tmp_path / "x.npy", "--png", fifo),
           "not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.parametrize("args", [["--dump-noise", str(2**62), "--ids", "0,1"],
                                  ["--dump-noise", str(2**40), "--ids", "0"]])
def test_requests_beyond_memory_are_one_line(runner_binary, tmp_path, args):
    """An overflowing or unallocatable size was "internal error", exit 1 (or a bad_alloc)."""
    _fails(run(runner_binary, *args, "--out", tmp_path / "n.npy"), "lower --dump-noise")
    assert not (tmp_path / "n.npy").exists()
