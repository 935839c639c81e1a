"""Issue 24, items 1, 3 and 19: the bytes checked are the bytes loaded; a trust file others could
write is refused; a damaged trust file is an error, never read as empty nor overwritten."""
from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest
import torch

import cfgengine
from cfgengine import metrics, trust
from tests.conftest import cli_fails

TRUSTED, SWAPPED = b"the trusted bytes", b"bytes swapped in after the check"


@pytest.fixture
def own_trust_file(tmp_path, monkeypatch) -> Path:
    """A fresh trust file for one test, in a private folder."""
    folder = tmp_path / "config"
    folder.mkdir(mode=0o700)
    path = folder / "trusted.json"
    monkeypatch.setenv(trust.ENV, str(path))
    return path


def _bytes_of(source) -> bytes:
    return source.getvalue() if isinstance(source, io.BytesIO) else Path(source).read_bytes()


def _swapping_loader(path: Path, seen: list):
    """A loader hook run between the trust check and the load: a racing writer replaces `path`,
    then the hook records the bytes it was given to load."""
    def load(source, *args, **kwargs):
        path.write_bytes(SWAPPED)
        seen.append(_bytes_of(source))
        if not isinstance(source, io.BytesIO):  # a private copy: nobody else may enter it
            assert stat.S_IMODE(Path(source).parent.stat().st_mode) == 0o700
        raise RuntimeError("stop: only the bytes matter here")
    return load


RACES = {  # code file → (its name, the loader the race is won before, how it is loaded)
    "AOTInductor package": ("m.pt2", (torch._inductor, "aoti_load_package"), cfgengine.load),
    "TorchScript": ("net.pt", (torch.jit, "load"), metrics._load_network),
}


@pytest.mark.parametrize("kind", list(RACES))
def test_code_swapped_between_check_and_load_is_not_loaded(tmp_path, monkeypatch, kind):
    """A racing rename won 1 of 9 loads: the trust check hashed the path, torch reopened it."""
    name, (module, loader), load = RACES[kind]
    code = tmp_path / name
    code.write_bytes(TRUSTED)
    trust.record(code)
    seen: list[bytes] = []
    monkeypatch.setattr(module, loader, _swapping_loader(code, seen))
    with pytest.raises((ValueError, RuntimeError)):
        load(code)
    assert seen == [TRUSTED]


def test_the_private_copy_is_removed(tmp_path):
    source = tmp_path / "m.pt2"
    source.write_bytes(TRUSTED)
    with trust.trusted_copy(source, "a test file", trust_code=True) as copy:
        assert copy.read_bytes() == TRUSTED and copy.parent != tmp_path
    assert not copy.parent.exists()


@pytest.mark.parametrize("mode", [0o666, 0o646])
def test_world_writable_trust_file_is_refused(own_trust_file, tmp_path, mode):
    exported = tmp_path / "m.pt2"
    exported.write_bytes(TRUSTED)
    trust.record(exported)
    own_trust_file.chmod(mode)
    with pytest.raises(ValueError, match="everyone may write .*trusted.json"):
        trust.is_trusted(exported)
    with pytest.raises(ValueError, match="everyone may write"):
        cfgengine.load(exported)
    with pytest.raises(ValueError, match="everyone may write"):
        trust.record(exported)


def test_trust_file_in_a_folder_everyone_may_write_is_refused(own_trust_file, tmp_path, capsys):
    exported = tmp_path / "m.pt2"
    exported.write_bytes(TRUSTED)
    trust.record(exported)
    own_trust_file.parent.chmod(0o777)
    cli_fails(capsys, ["sample", "--ckpt", str(exported), "--out", str(tmp_path / "x.png")],
              "refusing the trust file's folder", "everyone may write", "chmod o-w")
    own_trust_file.parent.chmod(0o777 | stat.S_ISVTX)  # like /tmp: others cannot replace it
    assert trust.is_trusted(exported)


def test_damaged_trust_file_is_an_error_and_never_overwritten(own_trust_file, tmp_path, capsys):
    """One syntax error read as empty, and the next export rewrote the file with one entry."""
    entries = {f"{k:064x}": f"/models/{k}.pt2" for k in range(3)}
    damaged = json.dumps(entries, indent=1).replace('",\n', '"\n', 1)  # one missing comma
    own_trust_file.write_text(damaged)
    exported = tmp_path / "m.pt2"
    exported.write_bytes(TRUSTED)
    for attempt in (lambda: trust.is_trusted(exported), lambda: trust.record(exported)):
        with pytest.raises(ValueError, match=r"trusted.json: damaged trust file, not valid JSON "
                                             r"\(Expecting ',' delimiter: line 3"):
            attempt()
    cli_fails(capsys, ["export", "default", "--format", "aoti", "-o", str(tmp_path / "d.pt2")],
              str(own_trust_file), "not valid JSON")
    assert own_trust_file.read_text() == damaged
    assert not (tmp_path / "d.pt2").exists()


def test_trust_file_that_is_not_an_object_is_an_error(own_trust_file, tmp_path):
    own_trust_file.write_text("[]")
    with pytest.raises(ValueError, match="not a JSON object"):
        trust.record(tmp_path)
    assert own_trust_file.read_text() == "[]"


def test_trust_file_of_another_user_is_refused(own_trust_file, monkeypatch):
    own_trust_file.write_text("{}")
    monkeypatch.setattr(os, "getuid", lambda: os.stat(own_trust_file).st_uid + 1)
    if os.stat(own_trust_file).st_uid == 0:
        pytest.skip("root's files are accepted for every user")
    with pytest.raises(ValueError, match="belongs to another user"):
        trust.trusted_hashes()
