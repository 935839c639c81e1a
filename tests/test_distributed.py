"""torchrun (docs/design.md, "torchrun"): 2 CPU ranks over gloo write what one process writes —
sample's .npz, eval's statistics — DDP training resumes exactly, a failing rank fails the job with
one line and no files; every flag of sample/eval/train and every torchrun line of the README and
docs/ gets past torchrun's own parser. Three torchrun launches in all (each costs a few seconds of start-up)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.run import get_args_parser

from cfgengine import checkpoint, cli, distributed, metrics
from cfgengine.data import load_dataset
from cfgengine.sampler import sample
from cfgengine.unet import UNet, preset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH = ["--standalone", "--nproc_per_node=2"]
OLD_SPELLINGS = {"--n", "--v"}  # kept for one process; torchrun's parser calls them ambiguous
SAMPLE = ["sample", "--ckpt", "default", "--w", "0,1", "--steps", "4", "--per-class", "2",
          "--seed", "3"]
TRAIN = ["train", "--data", "gmm", "--preset", "tiny", "--batch-size", "8", "--ckpt-every", "5",
         "--sample-every", "100", "--sample-steps", "4"]


def torchrun(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The venv's torchrun script with 2 ranks, one torch thread each, bounded in time."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}",
               **(env or {})}
    for name in distributed.ENV + ("LOCAL_RANK",):  # never inherit an outer job's rendezvous
        environ.pop(name, None)
    script = BIN / "torchrun"  # the venv's; else torch's module (same parser, same agent)
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return subprocess.run([*launcher, *LAUNCH, *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=300)


def helper(commands: list[list[str]], cwd: Path, env: dict | None = None):
    """Several cfgengine command lines in one torchrun launch (tests/torchrun_commands.py)."""
    return torchrun([str(ROOT / "tests" / "torchrun_commands.py"), json.dumps(commands)], cwd, env)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# In one process: shards, moments, streams, sample ids


@pytest.mark.parametrize("count,size", [(7, 2), (50, 3), (2, 4)])
def test_shards_cover_every_id_once_in_order(monkeypatch, count, size):
    shards = []
    for rank in range(size):
        monkeypatch.setattr(distributed, "_world", distributed.World(rank, size))
        shards.append(distributed.shard(count))
    ids = [i for s in shards for i in range(s.start, s.stop)]
    assert ids == list(range(count))
    lengths = [s.stop - s.start for s in shards]
    assert max(lengths) - min(lengths) <= 1


def test_moments_of_shards_add_up_to_one_gaussian_fit():
    """Summed moments of 4 uneven shards (one empty) give gaussian_fit's μ and Σ of the union to 1e-12."""
    gen = np.random.default_rng(5)
    features = gen.standard_normal((301, 17)) @ gen.standard_normal((17, 17)) + 4.0
    center = gen.standard_normal(17)
    parts = np.split(features, [90, 91, 91])  # uneven, one shard empty
    total = sum(metrics.moments(part, center) for part in parts)
    fit, summed = metrics.gaussian_fit(features), metrics.gaussian_from_moments(total, center)
    assert summed.n == fit.n == 301
    np.testing.assert_allclose(summed.mu, fit.mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(summed.sigma, fit.sigma, rtol=0, atol=1e-12 * np.abs(fit.sigma).max())


def test_rank_streams_are_distinct_and_rank_0_is_one_process():
    seeds = {distributed.stream_seed(7, stream, rank) for stream in (0, 1) for rank in range(4)}
    assert len(seeds) == 8
    assert distributed.stream_seed(7, 0, 0) == 7 and distributed.stream_seed(7, 1, 0) == 8
    assert distributed.stream_seed(7, 0, 1, step=5) != distributed.stream_seed(7, 0, 1)


def test_sample_ids_key_the_rows(gmm):
    """Rows a..b sampled alone with sample_ids a..b equal those rows of the whole batch."""
    labels = torch.arange(gmm.num_classes).repeat(5)
    whole = sample(gmm, labels, w=1.0, steps=6, seed=2)
    part = sample(gmm, labels[7:19], w=1.0, steps=6, seed=2, sample_ids=torch.arange(7, 19))
    torch.testing.assert_close(part, whole[7:19], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sample_ids"):
        sample(gmm, labels, steps=6, sample_ids=torch.arange(3))


# ---------------------------------------------------------------------------------------------
# torchrun's own parser: flags after the program belong to the program


def _flags(command: str) -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return {flag for action in sub.choices[command]._actions for flag in action.option_strings}


def _torchrun_accepts(program_args: list[str]) -> bool:
    try:
        parsed = get_args_parser().parse_args([*LAUNCH, "--no-python", "cfgengine",
                                               *program_args])
    except SystemExit:
        return False
    return parsed.training_script == "cfgengine" and parsed.training_script_args == program_args


@pytest.mark.parametrize("command", ["sample", "eval", "train"])
def test_torchrun_passes_every_flag_through(command, capsys):
    """Every flag of the command reaches the program through torchrun's parser, except the old
    spellings kept for one process (torchrun rejects `--n` and `--v` as ambiguous)."""
    rejected = {flag for flag in _flags(command) if not _torchrun_accepts([command, flag, "1"])}
    assert rejected <= OLD_SPELLINGS, rejected
    capsys.readouterr()


def test_readme_torchrun_lines_parse_as_written(capsys):
    """Every `torchrun …` line of the README and docs/ passes torchrun's parser and cfgengine's."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages).replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("torchrun ")]
    assert len(lines) >= 3
    for line in lines:
        words = line.split("#")[0].split()[1:]
        parsed = get_args_parser().parse_args(words)
        assert parsed.no_python and parsed.training_script == "cfgengine", line
        args = cli.build_parser().parse_args(parsed.training_script_args)
        assert args.command in ("sample", "eval", "train"), line
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# Two ranks


def test_torchrun_sample_writes_the_single_process_npz(tmp_path):
    """`torchrun … --no-python cfgengine sample` as documented: uint8 images equal to one
    process's (at most 1 level where float rounding differs), same labels and w."""
    result = torchrun(["--no-python", "cfgengine", *SAMPLE, "--out", "two.png", "--npz",
                       "two.npz"], tmp_path)
    _ok(result)
    assert result.stdout.count("32 samples") == 1  # rank 0 alone reports
    assert cli.main([*SAMPLE, "--out", str(tmp_path / "one.png"),
                     "--npz", str(tmp_path / "one.npz")]) == 0
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert one["arr_0"].dtype == two["arr_0"].dtype == np.uint8
        assert one["arr_0"].shape == two["arr_0"].shape == (32, 16, 16, 3)
        diff = np.abs(one["arr_0"].astype(int) - two["arr_0"].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
        assert np.array_equal(one["labels"], two["labels"])
        assert np.array_equal(one["w"], two["w"])
    assert (tmp_path / "two.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "one.png", "two.npz",
                                                         "two.png"]


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> str:
    """An untrained tiny digits UNet saved as EMA weights (eval needs a known dataset)."""
    torch.manual_seed(0)
    net = UNet(preset("tiny", num_classes=10, image_size=8, in_channels=1))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    checkpoint.save_ema_weights(net.state_dict(), checkpoint.config_dict(net.config),
                                checkpoint.dataset_dict(load_dataset("digits").info), path)
    return str(path)


def _eval(model: str, base: Path, name: str) -> list[str]:
    return ["eval", "--ckpt", model, "--w", "0,1.5", "--steps", "3", "--per-cell", "21",
            "--bootstrap", "5", "--out-dir", str(base / name), "--cache-dir", str(base / f"{name}-cache")]


@pytest.fixture(scope="module")
def two_ranks(digits_model, tmp_path_factory):
    """One launch: eval; DDP training to 5 steps, resumed to 10; the same training straight."""
    base = tmp_path_factory.mktemp("ranks")
    commands = [_eval(digits_model, base, "eval2"),
                [*TRAIN, "--steps", "5", "--out", str(base / "resumed")],
                ["train", "--resume", str(base / "resumed" / "ckpt.pt"), "--steps", "10"],
                [*TRAIN, "--steps", "10", "--out", str(base / "straight")]]
    result = helper(commands, base)
    _ok(result)
    return base, result


def test_torchrun_eval_statistics_equal_one_process(two_ranks, digits_model):
    """Every metric (value and interval) of the 2-rank eval equals one process's within 1e-9;
    the sample shard is the same."""
    base, _ = two_ranks
    assert cli.main(_eval(digits_model, base, "eval1")) == 0
    one = json.loads((base / "eval1" / "results.json").read_text())["cells"]
    two = json.loads((base / "eval2" / "results.json").read_text())["cells"]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert (a["w"], a["n"]) == (b["w"], b["n"])
        for name in ("fid", "inception_score", "precision", "recall", "accuracy"):
            for part in ("value", "low", "high"):
                assert b[name][part] == pytest.approx(a[name][part], rel=1e-9, abs=1e-12), name
    shard = "tiny-T3.npz"
    with np.load(base / "eval1" / "samples" / shard) as s1, \
            np.load(base / "eval2" / "samples" / shard) as s2:
        assert np.abs(s1["arr_0"].astype(int) - s2["arr_0"].astype(int)).max() <= 1
        assert np.array_equal(s1["labels"], s2["labels"]) and np.array_equal(s1["w"], s2["w"])


def test_ddp_training_resumes_exactly_at_the_same_world_size(two_ranks):
    """10 DDP steps straight equal 5 steps + resume to 10 bit for bit (EMA, weights, optimizer),
    and the checkpoint holds both ranks' RNG streams."""
    base, _ = two_ranks
    straight = checkpoint.read_checkpoint(base / "straight" / "ckpt.pt")
    resumed = checkpoint.read_checkpoint(base / "resumed" / "ckpt.pt")
    assert straight["step"] == resumed["step"] == 10
    for part in ("model", "ema"):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part])
    assert len(straight["rng"]["ranks"]) == 2
    streams = straight["rng"]["ranks"]
    assert not torch.equal(streams[0]["noise"], streams[1]["noise"])  # a stream per rank
    assert torch.equal(streams[0]["noise"], straight["rng"]["noise"])
    assert (base / "straight" / "model.safetensors").is_file()


def test_ddp_checkpoint_resumes_in_one_process(two_ranks, tmp_path):
    """Another world size is allowed: one process continues the 2-rank run to step 12."""
    base, _ = two_ranks
    shutil.copy(base / "straight" / "ckpt.pt", tmp_path / "ckpt.pt")
    assert cli.main(["train", "--resume", str(tmp_path / "ckpt.pt"), "--steps", "12",
                     "--out", str(tmp_path)]) == 0
    assert checkpoint.read_checkpoint(tmp_path / "ckpt.pt")["step"] == 12


def test_a_failing_rank_fails_the_job_with_one_line_and_no_files(tmp_path):
    """Rank 1 alone hits sampling's NaN error: the job fails, that error is the only line
    cfgengine prints (no traceback of ours), and no output file, whole or partial, exists."""
    out = tmp_path / "out"
    out.mkdir()
    result = helper([[*SAMPLE, "--out", str(out / "f.png"), "--npz", str(out / "f.npz")]],
                    tmp_path, env={"FAIL_RANK": "1", "FAIL_HOW": "nan"})
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("cfgengine")]
    assert ours == ["cfgengine: error: sampling produced NaN/inf on this rank (injected)"]
    assert not re.search(r"File \".*/cfgengine/", result.stderr)
    assert list(out.iterdir()) == []


def test_ranks_that_disagree_on_flags_or_model_stop_with_one_line_and_no_files(tmp_path):
    """Rank 1 given other --classes, --w or --seed (one launch, a command each), then the same
    flags but other weights: each command fails with one line naming what differs, every rank
    stops, and nothing is written."""
    out = tmp_path / "out"
    out.mkdir()
    command = [*SAMPLE, "--out", str(out / "f.png"), "--npz", str(out / "f.npz")]
    rank1 = [["--classes", "1,2"], ["--w", "0,2"], ["--seed", "4"], []]
    result = helper([command] * 4, tmp_path, env={
        "RANK_ARGS": json.dumps({"1": rank1}), "PERTURB_RANK": "1", "KEEP_GOING": "1"})
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("cfgengine")]
    assert len(ours) == 4, result.stderr[-3000:]
    assert all("disagree on the command's flags" in line for line in ours[:3]), ours
    assert "disagree on the model" in ours[3], ours
    assert not re.search(r"File \".*/cfgengine/", result.stderr)
    assert list(out.iterdir()) == []
