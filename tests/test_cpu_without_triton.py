"""CPU sampling never imports Triton: it is the `gpu` and `test` extra (pyproject.toml), so a CPU
install may lack it, and loading it costs seconds. Each case runs in a fresh interpreter, since
this test process may already hold Triton (the kernel tests import it)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

API = ("import sys, torch, cfgengine\n"
       "cfgengine.sample(cfgengine.load('default'), torch.arange(2), steps=4)\n")
CLI = ("import sys\n"
       "from cfgengine.cli import main\n"
       "assert main(['sample', '--steps', '4', '--out', {out!r}{more}]) == 0\n")
CHECK = "assert 'triton' not in sys.modules, 'CPU sampling imported triton'\n"


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", CFGENGINE_CACHE_DIR=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code + CHECK], env=env, capture_output=True,
                          text=True, timeout=600)


def test_python_sampling_on_cpu_does_not_import_triton(tmp_path):
    done = _run(API, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_cli_sampling_on_cpu_does_not_import_triton(tmp_path, backend):
    if backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed")
    out = tmp_path / "x.png"
    done = _run(CLI.format(out=str(out), more=f", '--backend', {backend!r}"), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.exists()
