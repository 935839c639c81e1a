"""Session fixtures for the C++ runner: `cfgengine-run` built once (CMake reuses an up-to-date
build/), and one AOTInductor export of the randomly initialised tiny UNet to sample."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import MAX_BATCH  # the shared export: 18 labels sample in two chunks

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build"


def _skip_reason() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake is not installed: the C++ runner cannot be built"
    prefix = Path(torch.utils.cmake_prefix_path)
    if not (prefix / "Torch" / "TorchConfig.cmake").is_file():
        return f"the installed torch ships no CMake config ({prefix}/Torch): no libtorch to link"
    return None


def _run_cmake(*args: str) -> None:
    done = subprocess.run(["cmake", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cmake {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


@pytest.fixture(scope="session")
def runner_binary() -> Path:
    """build/cfgengine-run, configured and built as docs/runner.md says (a no-op when up to date)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    _run_cmake("-S", str(REPO), "-B", str(BUILD),
               f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}")
    _run_cmake("--build", str(BUILD), "--parallel", "2")
    return BUILD / "cfgengine-run"


@pytest.fixture(scope="session")
def runner_package(aoti_path) -> Path:
    """The session's AOTInductor export of the re-drawn tiny UNet (CPU, fp32, batches 1..16),
    shared with the export tests."""
    return aoti_path


@pytest.fixture(scope="session")
def runner_backend(runner_package):
    """The same package loaded by Python: the reference the runner must equal."""
    from cfgengine.export import aoti

    return aoti.load(runner_package)
