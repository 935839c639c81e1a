"""cfgengine-run against the Python side on the same AOTInductor package: the samples of
`cfgengine.sample` (ancestral, DDIM, DPM-Solver++(2M), each grid), the Philox noise of
cfgengine/rng.py, the PNG grid against Pillow's decoder, and exit status 2 for bad inputs."""
from __future__ import annotations

import inspect
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import cfgengine
from cfgengine import rng, tables

TOLERANCE = 1e-4  # max |Δ| on x̂ ∈ [−1, 1] (the bound)
SEED = 2**40 + 5  # both Philox key words non-zero


def run(binary: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def run_cpp(binary, package, out, labels, **flags) -> np.ndarray:
    """x̂ from cfgengine-run with `--name value` for each flag."""
    args = [package, "--labels", ",".join(map(str, labels)), "--out", out]
    for name, value in flags.items():
        args += [f"--{name}", value]
    done = run(binary, *args)
    assert done.returncode == 0, done.stderr
    return np.load(out)


def check_parity(runner_binary, runner_backend, runner_package, tmp_path, labels, **settings):
    """Runner and cfgengine.sample on one request; returns the sample for further checks."""
    x_cpp = run_cpp(runner_binary, runner_package, tmp_path / "x.npy", labels, seed=SEED,
                    **settings)
    settings = {k.replace("-", "_"): v for k, v in settings.items()}
    x_py = cfgengine.sample(runner_backend, torch.tensor(labels), seed=SEED,
                            batch_size=runner_backend.meta.max_batch, **settings).numpy()
    assert x_cpp.dtype == np.float32 and x_cpp.shape == x_py.shape
    assert float((np.abs(x_py) < 0.999).mean()) > 0.01, "everything clipped: a vacuous test"
    assert float(np.abs(x_cpp - x_py).max()) <= TOLERANCE
    return x_cpp


@pytest.mark.parametrize("sampler, settings", [
    ("ancestral", {"w": 1.5, "v": 0.3}),
    ("ancestral", {"w": 0.0, "v": 1.0}),  # w = 0: the conditional half only
    ("ddim", {"w": 0.3, "eta": 0.0}),
    ("ddim", {"w": 4.0, "eta": 0.6}),
])
def test_samples_match_python(runner_binary, runner_backend, runner_package, tmp_path, sampler,
                              settings):
    check_parity(runner_binary, runner_backend, runner_package, tmp_path, [7, 0, 3, 3, 5],
                 sampler=sampler, steps=4, **settings)


def test_chunks_of_max_batch_match_python(runner_binary, runner_backend, runner_package, tmp_path):
    """18 labels > the export's 16: two chunks, each sample still keyed by its own id."""
    labels = [(5 * i + 1) % 8 for i in range(18)]
    check_parity(runner_binary, runner_backend, runner_package, tmp_path, labels,
                 sampler="ancestral", steps=2, w=0.7)


@pytest.mark.skipif("dpmpp_2m" not in tables.SAMPLERS,
                    reason="cfgengine.tables has no dpmpp_2m yet (Python side of issue 13)")
def test_dpmpp_2m_matches_python(runner_binary, runner_backend, runner_package, tmp_path):
    check_parity(runner_binary, runner_backend, runner_package, tmp_path, [1, 6, 2],
                 sampler="dpmpp_2m", steps=5, w=1.0)


@pytest.mark.skipif("grid" not in inspect.signature(cfgengine.sample).parameters,
                    reason="cfgengine.sample has no grid= yet (Python side of issue 13)")
@pytest.mark.parametrize("grid", ["cosine-authors", "uniform", "karras"])
def test_grids_match_python(runner_binary, runner_backend, runner_package, tmp_path, grid):
    sampler = "dpmpp_2m" if "dpmpp_2m" in tables.SAMPLERS else "ddim"
    check_parity(runner_binary, runner_backend, runner_package, tmp_path, [4, 1],
                 sampler=sampler, steps=4, w=0.5, grid=grid)


@pytest.mark.parametrize("seed", [0, 2**33 + 1, 2**63 - 1])
def test_noise_matches_rng(runner_binary, tmp_path, seed):
    """--dump-noise: the runner's Philox4x32-10 + Box–Muller against rng.randn, ids ≥ 2³²,
    a k ≥ 2³² (only its low word keys the draw) and a length that is not a multiple of 4."""
    ids = [0, 3, 2**32, 2**32 + 7, 2**62 + 11]
    for k in (0, 2**32 + 2):
        out = tmp_path / f"noise-{k}.npy"
        done = run(runner_binary, "--dump-noise", 13, "--ids", ",".join(map(str, ids)),
                   "--k", k, "--seed", seed, "--out", out)
        assert done.returncode == 0, done.stderr
        ref = rng.randn(seed, torch.tensor(ids), k, 13).numpy()
        np.testing.assert_allclose(np.load(out), ref, rtol=0, atol=1e-6)


def test_png_grid_decodes_to_the_samples(runner_binary, runner_package, tmp_path):
    """Pillow decodes the hand-rolled PNG (stored deflate, CRC-32, Adler-32) to the samples'
    bytes: one row per label in ascending order, 1-pixel white gutters."""
    from PIL import Image

    labels = [5, 2, 5]
    x = run_cpp(runner_binary, runner_package, tmp_path / "x.npy", labels, steps=2,
                png=tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as image:
        grid = np.asarray(image.convert("RGB"))
    images = np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    size = x.shape[-1]
    assert grid.shape == (2 * (size + 1) + 1, 2 * (size + 1) + 1, 3)
    cell = lambda r, c: grid[1 + r * (size + 1):][:size, 1 + c * (size + 1):][:, :size]
    for (r, c), i in {(0, 0): 1, (1, 0): 0, (1, 1): 2}.items():
        np.testing.assert_array_equal(cell(r, c), images[i])
    assert (cell(0, 1) == 255).all() and (grid[0] == 255).all()


def _foreign_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.txt", "not a model")
    return path


def _package_with_metadata(path: Path, stored: dict) -> Path:
    """A zip laid out like an AOTInductor package's metadata (no model): what the runner reads
    and checks before it loads anything."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pkg/archive_format", "pt2")  # the loader finds the package root by it
        archive.writestr("pkg/data/aotinductor/model/x.wrapper_metadata.json", json.dumps(stored))
    return path


def _stale_package(path: Path, **changes) -> Path:
    """A package whose cfgengine metadata differs from a valid version-2 one by `changes`."""
    meta = {"format": "cfgengine-export", "version": 2, "program": "denoiser",
            "num_classes": 8, "sample_shape": [3, 16, 16], "clip": 1.0, "min_batch": 1,
            "max_batch": 16, "logsnr_range": [-20.0, 20.0]}
    meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
    return _package_with_metadata(path, {"cfgengine": json.dumps(meta), "AOTI_DEVICE_KEY": "cpu"})


BAD_REQUESTS = {
    "missing file": lambda pkg, tmp: [tmp / "absent.pt2", "--labels", "1"],
    "text file": lambda pkg, tmp: [_write(tmp / "notes.pt2", "hello"), "--labels", "1"],
    "foreign zip": lambda pkg, tmp: [_foreign_zip(tmp / "other.pt2"), "--labels", "1"],
    "no cfgengine metadata": lambda pkg, tmp: [
        _package_with_metadata(tmp / "m.pt2", {"AOTI_DEVICE_KEY": "cpu"}), "--labels", "1"],
    "metadata not JSON": lambda pkg, tmp: [
        _package_with_metadata(tmp / "m.pt2", {"cfgengine": "{oops"}), "--labels", "1"],
    "format version 1": lambda pkg, tmp: [_stale_package(tmp / "m.pt2", version=1), "--labels", "1"],
    "no sample shape": lambda pkg, tmp: [
        _stale_package(tmp / "m.pt2", sample_shape=None), "--labels", "1"],
    "bad logsnr range": lambda pkg, tmp: [
        _stale_package(tmp / "m.pt2", logsnr_range=[3, -3]), "--labels", "1"],
    "prompt model": lambda pkg, tmp: [_stale_package(
        tmp / "m.pt2", num_classes=0, conditioning="text",
        text_inputs={"encoder_hidden_states": [12, 16]}), "--labels", "0"],
    "label out of range": lambda pkg, tmp: [pkg, "--labels", "1,9"],
    "null label": lambda pkg, tmp: [pkg, "--labels", "8"],
    "negative label": lambda pkg, tmp: [pkg, "--labels", "-1"],
    "no labels": lambda pkg, tmp: [pkg],
    "bad sampler": lambda pkg, tmp: [pkg, "--labels", "1", "--sampler", "euler"],
    "bad grid": lambda pkg, tmp: [pkg, "--labels", "1", "--grid", "linear"],
    "v above 1": lambda pkg, tmp: [pkg, "--labels", "1", "--v", "2"],
    "eta not a number": lambda pkg, tmp: [pkg, "--labels", "1", "--eta", "x"],
    "one step": lambda pkg, tmp: [pkg, "--labels", "1", "--steps", "1"],
    "w not finite": lambda pkg, tmp: [pkg, "--labels", "1", "--w", "nan"],
    "negative seed": lambda pkg, tmp: [pkg, "--labels", "1", "--seed", "-3"],
    "unknown flag": lambda pkg, tmp: [pkg, "--labels", "1", "--cfg", "2"],
    "flag without value": lambda pkg, tmp: [pkg, "--out", tmp / "x.npy", "--labels"],
    "wrong device": lambda pkg, tmp: [pkg, "--labels", "1", "--device", "cuda"],
    "missing out folder": lambda pkg, tmp: [pkg, "--labels", "1", "--out", tmp / "no" / "x.npy"],
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SAYS = {  # what each case's line must name
    "missing file": "no such model file", "text file": "not a loadable AOTInductor package",
    "foreign zip": "not a loadable AOTInductor package",
    "no cfgengine metadata": "no cfgengine metadata", "metadata not JSON": "not valid JSON",
    "format version 1": "version 1, this runner reads version 2; re-export",
    "no sample shape": "'sample_shape'", "bad logsnr range": "'logsnr_range'",
    "prompt model": "a prompt-conditioned model; cfgengine-run samples class-conditional",
    "label out of range": "label 9 is out of range [0, 8)",
    "null label": "label 8 is out of range [0, 8)", "negative label": "--labels must be >= 0",
    "no labels": "--labels is required", "bad sampler": "--sampler must be one of",
    "bad grid": "--grid must be one of", "v above 1": "--v must be a number in [0, 1]",
    "eta not a number": "--eta must be a finite number", "one step": "--steps must be",
    "w not finite": "--w must be a finite number", "negative seed": "--seed must be >= 0",
    "unknown flag": "unknown flag --cfg", "flag without value": "--labels needs a value",
    "wrong device": "compiled for cpu, cannot run on cuda", "missing out folder": "does not exist",
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_inputs_exit_2(runner_binary, runner_package, tmp_path, case):
    args = BAD_REQUESTS[case](runner_package, tmp_path)
    if "--out" not in args:
        args += ["--out", tmp_path / "x.npy"]
    done = run(runner_binary, *args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.startswith("cfgengine-run: error: ") and done.stderr.count("\n") == 1
    assert SAYS[case] in done.stderr
    assert not (tmp_path / "x.npy").exists()
