"""`cfgengine eval` at toy size (a randomly initialised tiny UNet on digits, two w, T = 3): well-formed
shards, JSON, markdown and plots; user errors exit 2 with one line and write nothing; the study's
claim judgements follow the interval rule."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cfgengine import checkpoint, cli
from cfgengine.bench.studies import fid_w
from cfgengine.data import load_dataset
from cfgengine.evaluate import PLOTS
from cfgengine.unet import UNet, preset

W, STEPS, N = "0,1.5", "3", 20


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """An untrained tiny digits UNet exported like a trained one."""
    info = load_dataset("digits").info
    torch.manual_seed(0)
    net = UNet(preset("tiny", num_classes=10, image_size=8, in_channels=1))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    checkpoint.save_ema_weights(net.state_dict(), checkpoint.config_dict(net.config),
                                  checkpoint.dataset_dict(info), path)
    return str(path)


@pytest.fixture(scope="module")
def evaluated(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    code = cli.main(["eval", "--ckpt", tiny_model, "--w", W, "--steps", STEPS, "--n", str(N),
                     "--bootstrap", "5", "--out-dir", str(base / "out"),
                     "--cache-dir", str(base / "cache")])
    return code, base / "out"


def test_eval_writes_one_shard_per_configuration(evaluated):
    code, out = evaluated
    assert code == 0
    with np.load(out / "samples" / f"tiny-T{STEPS}.npz") as shard:
        assert shard["arr_0"].dtype == np.uint8 and shard["arr_0"].shape == (2 * N, 8, 8, 1)
        assert shard["w"].tolist() == [0.0] * N + [1.5] * N  # both w in one sampling pass
        assert np.bincount(shard["labels"][:N]).tolist() == [2] * 10  # class-balanced


def test_eval_writes_json_markdown_and_plots(evaluated):
    _, out = evaluated
    results = json.loads((out / "results.json").read_text())
    assert [(c["w"], c["steps"], c["n"]) for c in results["cells"]] == [(0.0, 3, N), (1.5, 3, N)]
    for cell in results["cells"]:
        for name in ("fid", "inception_score", "precision", "recall", "accuracy"):
            assert cell[name]["low"] <= cell[name]["high"] and np.isfinite(cell[name]["value"])
    assert (out / "results.md").read_text().count("| tiny | 3 |") == 2
    for plot in PLOTS:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no temp files left behind


@pytest.mark.parametrize("flags, mention", [
    (["--w", "0,x"], "--w"),
    (["--steps", "1"], "--steps"),
    (["--steps", "a"], "--steps"),
    (["--n", "2"], "--n"),
    (["--w", "1,1"], "--w"),
    (["--features", "missing.pt"], "missing.pt"),
    (["--out-dir", "no/such/parent/out"], "--out-dir"),
])
def test_bad_flags_exit_2_and_write_nothing(tiny_model, tmp_path, capsys, flags, mention):
    args = ["eval", "--ckpt", tiny_model, "--w", W, "--steps", STEPS, "--n", str(N),
            "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *flags]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and mention in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_model_exits_2(tmp_path, capsys):
    assert cli.main(["eval", "--ckpt", str(tmp_path / "none.pt"), "--out-dir",
                     str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def _cells(fid_by_w: dict, is_by_w: dict, width: float = 0.1) -> list[dict]:
    """Synthetic cells of one model at one T with intervals of ± width."""
    def iv(v):
        return {"value": v, "low": v - width, "high": v + width}
    return [{"model": "m", "p_uncond": 0.1, "steps": 8, "w": w, "fid": iv(fid_by_w[w]),
             "inception_score": iv(is_by_w[w]), "recall": iv(0.5)} for w in fid_by_w]


def test_claims_follow_the_interval_rule():
    fid = {0.0: 3.0, 0.3: 2.0, 1.0: 4.0, 4.0: 6.0}
    rising = {0.0: 1.0, 0.3: 2.0, 1.0: 3.0, 4.0: 4.0}
    verdicts = [c["verdict"] for c in fid_w.judge_claims({"cells": _cells(fid, rising)})]
    assert verdicts[:2] == ["holds", "holds"]
    overlapping = {0.0: 1.0, 0.3: 1.05, 1.0: 3.0, 4.0: 4.0}  # first IS step within the intervals
    claims = fid_w.judge_claims({"cells": _cells(fid, overlapping)})
    assert claims[1]["verdict"] == "inconclusive"
    falling = {0.0: 1.0, 0.3: 2.0, 1.0: 3.0, 4.0: 2.0}
    assert fid_w.judge_claims({"cells": _cells(fid, falling)})[1]["verdict"] == "fails"


def test_no_samples_scores_the_same_and_writes_no_images(evaluated, tiny_model, tmp_path):
    _, out = evaluated
    assert cli.main(["eval", "--ckpt", tiny_model, "--w", W, "--steps", STEPS, "--n", str(N),
                     "--bootstrap", "5", "--out-dir", str(tmp_path / "out"),
                     "--cache-dir", str(tmp_path / "cache"), "--no-samples"]) == 0
    assert not (tmp_path / "out" / "samples").exists()
    keys = ("fid", "precision", "recall", "accuracy")
    with_shards = json.loads((out / "results.json").read_text())["cells"]
    without = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    assert [{k: c[k] for k in keys} for c in without] == [{k: c[k] for k in keys}
                                                          for c in with_shards]
