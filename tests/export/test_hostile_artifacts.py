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
    assert "--trust-code" in err and "is code that runs when loaded" in err
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


# ---------------------------------------------------------------------------------------------
# Item 7: edited metadata is checked against the graph.

def _edit_onnx(onnx_path, tmp_path, edit, redigest=False):
    """A copy of the ONNX export with its metadata JSON passed through `edit`; `redigest`
    recomputes the digest too, as a careful editor would."""
    import onnx

    from cfgengine.export import metadata

    proto = onnx.load_model(str(onnx_path))
    props = {p.key: p for p in proto.metadata_props}
    stored = json.loads(props[metadata.KEY].value)
    props[metadata.KEY].value = json.dumps(edit(stored), sort_keys=True)
    if redigest:
        props[metadata.DIGEST_KEY].value = metadata.digest(props[metadata.KEY].value,
                                                           proto.graph.SerializeToString())
    path = tmp_path / "edited.onnx"
    onnx.save_model(proto, str(path))
    return path


EDITS = {"clip null": lambda m: dict(m, clip=None),
         "program guided": lambda m: dict(m, program="guided"),
         "precision fp16": lambda m: dict(m, precision="fp16"),
         "num_classes 10": lambda m: dict(m, num_classes=10, class_names=[])}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_onnx_metadata_is_refused(onnx_path, tmp_path, capsys, edit):
    """Each of these ran silently (or gave an ORT traceback) before."""
    pytest.importorskip("onnxruntime")
    path = _edit_onnx(onnx_path, tmp_path, EDITS[edit])
    assert cli.main(["sample", "--ckpt", str(path), "--steps", "2", "--n", "1",
                     "--out", str(tmp_path / "x.png")]) == 2
    assert "re-export the model" in _one_error_line(capsys)


@pytest.mark.parametrize("edit, message", [("program guided", "program 'guided'"),
                                           ("precision fp16", "weights are fp32"),
                                           ("num_classes 10", "label table has")])
def test_redigested_onnx_metadata_is_still_checked_against_the_graph(onnx_path, tmp_path, edit,
                                                                     message):
    from cfgengine.export import onnx as onnx_export

    path = _edit_onnx(onnx_path, tmp_path, EDITS[edit], redigest=True)
    with pytest.raises(ValueError, match=message):
        onnx_export.load(path)


def edit_aoti_num_classes(aoti_path, edited, num_classes: int):
    """A copy of the package whose cfgengine metadata says `num_classes`."""
    import re

    with zipfile.ZipFile(aoti_path) as src, zipfile.ZipFile(edited, "w") as dst:
        hits = 0
        for name in src.namelist():
            data = src.read(name)
            if b"cfgengine-export" in data:
                data, n = re.subn(rb'(num_classes\\*": )\d+', rb"\g<1>%d" % num_classes, data)
                hits += n
            dst.writestr(name, data)
    assert hits
    return edited


@pytest.mark.parametrize("num_classes", [10, 4])
def test_edited_aoti_num_classes_is_one_line(aoti_path, tmp_path, capsys, num_classes):
    """num_classes 10 in a package compiled for fewer classes: a 74-line C++ traceback before;
    num_classes 4 (the graph has 8 + null) sampled label 4 as "null", exit 0 (issue 24 item 7)."""
    edited = edit_aoti_num_classes(aoti_path, tmp_path / "edited.pt2", num_classes)
    code = cli.main(["sample", "--ckpt", str(edited), "--trust-code", "--steps", "2", "--n",
                     "1", "--out", str(tmp_path / "x.png")])
    assert code == 2
    err = _one_error_line(capsys)
    assert "metadata does not fit the compiled package" in err
    assert f"num_classes {num_classes}, but its label table has 9 rows" in err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# Item 5 (exported side) and item 11 (the CLI's batch message).

def test_backend_returning_b_rows_is_refused(onnx_path):
    """An ONNX graph with copied metadata that returns B rows made guidance vanish silently."""
    from cfgengine.export import onnx as onnx_export

    backend = onnx_export.load(onnx_path)
    # the doubled batch of 2 rows is 4 rows; a graph answering half of them
    backend.run = lambda z, logsnr, labels: torch.zeros((z.shape[0] // 2, *backend.sample_shape))
    with pytest.raises(ValueError, match=r"returned eps of shape \(2, 3, 16, 16\) for a batch "
                                         r"of 4"):
        backend(torch.zeros(4, *backend.sample_shape), torch.zeros(4), torch.zeros(4).long())


def test_over_max_batch_names_the_cli_flag(onnx_path, tmp_path, capsys):
    from tests.export.conftest import MAX_BATCH

    code = cli.main(["sample", "--ckpt", str(onnx_path), "--steps", "2", "--n",
                     str(MAX_BATCH + 1), "--classes", "0", "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "--batch" in _one_error_line(capsys)
