"""The modules the installed package holds, found the way Python finds them: kernels/, export/ and
bench/ are mapped into cfgengine by pyproject.toml (cfgengine/__init__.py), so a walk of the
cfgengine/ folder alone would miss them; pyproject's package list names every package."""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def packages() -> list[str]:
    """Every package pyproject.toml installs, plus any subpackage pkgutil finds inside one."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = list(config["tool"]["setuptools"]["packages"])
    for name in list(names):
        for info in pkgutil.iter_modules(importlib.import_module(name).__path__, f"{name}."):
            if info.ispkg and info.name not in names:
                names.append(info.name)
    return names


def modules(*, with_packages: bool = True) -> list[str]:
    """The dotted name of every installed module (`__main__` entry points left out: they run on
    import); the packages themselves too unless `with_packages` is False."""
    names = []
    for package in packages():
        if with_packages:
            names.append(package)
        names += [f"{package}.{info.name}" for info in
                  pkgutil.iter_modules(importlib.import_module(package).__path__)
                  if not info.ispkg and info.name != "__main__"]
    return names


def source_file(name: str) -> Path:
    """Where the installed module `name` is read from (a wheel's copy or the editable mapping)."""
    return Path(importlib.util.find_spec(name).origin)
