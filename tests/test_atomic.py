"""Atomic writes: a file appears whole or not at all; several outputs appear together or none."""
import os

import pytest

from cfgengine.atomic import atomic_path, atomic_paths, check_writable, write_atomic


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]  # the temporary file is gone
    with atomic_path(target) as tmp:
        open(tmp, "wb").write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_atomic_paths_write_all_outputs_or_none(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.npz"
    with pytest.raises(ValueError):
        with atomic_paths(a, None, b) as (ta, none, tb):
            assert none is None
            open(ta, "wb").write(b"a")
            raise ValueError("the second write failed")
    assert not a.exists() and not b.exists() and os.listdir(tmp_path) == []
    with atomic_paths(a, b) as (ta, tb):
        open(ta, "wb").write(b"a")
        open(tb, "wb").write(b"b")
    assert a.read_bytes() == b"a" and b.read_bytes() == b"b"


def test_write_atomic_creates_the_folder_and_returns_the_path(tmp_path):
    path = write_atomic(lambda tmp: open(tmp, "w").write("x"), tmp_path / "sub" / "f.txt")
    assert path.read_text() == "x"


def test_check_writable_refuses_directories_and_missing_parents(tmp_path):
    check_writable(tmp_path / "fine.png", "--out")
    with pytest.raises(ValueError, match="--out: .* is a directory"):
        check_writable(tmp_path, "--out")
    with pytest.raises(ValueError, match="--npz: directory of .* does not exist"):
        check_writable(tmp_path / "none" / "x.npz", "--npz")
