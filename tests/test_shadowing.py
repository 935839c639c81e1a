"""Nothing run from the repository root shadows a third-party module: kernels/, export/ and bench/
are not packages there (their __init__.py live in cfgengine/; pyproject.toml maps the folders into
cfgengine), so `import kernels` from the root finds Hugging Face's `kernels`, which transformers
imports, while cfgengine.kernels / .export / .bench keep working."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.installed import ROOT

TOP_LEVEL_PACKAGES = {"cfgengine", "tests"}  # the only folders at the root that are packages


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_no_other_top_level_folder_is_a_package():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages <= TOP_LEVEL_PACKAGES, sorted(packages - TOP_LEVEL_PACKAGES)


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    done = _run_at_root("import transformers, transformers.models\n"
                        "from transformers import CLIPTextModel\n"
                        "import cfgengine.kernels, cfgengine.export, cfgengine.bench.harness\n"
                        "assert callable(cfgengine.kernels.guided_step)\n"
                        "assert callable(cfgengine.export.load)\n")
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_bare_folder_name_finds_the_installed_module():
    pytest.importorskip("kernels")  # Hugging Face's, a dependency of transformers' hub kernels
    done = _run_at_root("import kernels, pathlib, sys\n"
                        "print(pathlib.Path(kernels.__file__).resolve())\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not done.stdout.strip().startswith(str(ROOT.resolve() / "kernels")), done.stdout
