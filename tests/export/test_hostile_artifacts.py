"""Issue 14, hostile model files (items 1 and 7): a .pt2 is code and loads only when trusted;
edited export metadata is checked against the graph it describes."""
from __future__ import annotations

import json
import shutil
import subprocess
import zipfile

import pytest
import torch

from cfgengine import cli, trust
from cfgengine.export import aoti

CONSTRUCTOR = r"""
#include <stdio.h>
__attribute__((constructor)) static void pwn(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("ran", f); fclose(f); }
}
"""


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("cfgengine: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def evil_pt2(aoti_path, tmp_path):
    """A copy of a real cfgengine .pt2 whose *.so members are a library whose constructor writes
    `marker`: loading the package the old way (dlopen first) writes the marker."""
    marker = tmp_path / "marker"
    source = tmp_path / "evil.c"
    source.write_text(CONSTRUCTOR % marker)
    library = tmp_path / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(aoti_path) as src, zipfile.ZipFile(evil, "w") as dst:
        names = src.namelist()
        assert any(n.endswith(".so") for n in names)
        for name in names:
            data = library.read_bytes() if name.endswith(".so") else src.read(name)
            dst.writestr(name, data)
    return evil, marker


def test_untrusted_pt2_is_refused_before_dlopen(evil_pt2, capsys, tmp_path):
    evil, marker = evil_pt2
    code = cli.main(["sample", "--ckpt", str(evil), "--steps", "2", "--n", "1",
                     "--out", str(tmp_path / "x.png")])
    assert code == 2
    err = _one_error_line(capsys)
    assert "--trust-code" in err and "native code" in err
    assert not marker.exists()
    with pytest.raises(ValueError, match="trust_code=True"):
        aoti.load(evil)
    assert not marker.exists()
    assert not (tmp_path / "x.png").exists()


def test_the_crafted_package_really_runs_code_when_trusted(evil_pt2):
    """The refusal above is what stops it: with trust_code=True the constructor runs."""
    evil, marker = evil_pt2
    with pytest.raises(ValueError):  # the fake library lacks the model: loading then fails
        aoti.load(evil, trust_code=True)
    assert marker.read_text() == "ran"


def test_exports_of_this_machine_are_recorded_and_trusted(aoti_path, tmp_path, monkeypatch):
    assert trust.is_trusted(aoti_path)  # aoti_path was exported in this session
    copy = tmp_path / "copy.pt2"
    shutil.copy(aoti_path, copy)
    assert trust.is_trusted(copy)  # trust follows the bytes, not the path
    monkeypatch.setenv(trust.ENV, str(tmp_path / "other-user.json"))
    assert not trust.is_trusted(copy)
    with pytest.raises(ValueError, match="not written by `cfgengine export`"):
        aoti.load(copy)
    assert aoti.load(copy, trust_code=True).num_classes > 0


def test_trust_file_location(monkeypatch, tmp_path):
    monkeypatch.delenv(trust.ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert trust.trust_file() == tmp_path / "cfgengine" / "trusted.json"
    source = tmp_path / "f.bin"
    source.write_bytes(b"exported")
    trust.record(source)
    assert json.loads(trust.trust_file().read_text()) == {trust.file_sha256(source): str(source)}
