"""The modules the installed package holds. kernels/, export/ and bench/ are mapped into cfgengine
by pyproject.toml (cfgengine/__init__.py says how), so a walk of the cfgengine/ folder alone would
miss them; an editable install finds their modules through the mapping, not through the package's
`__path__`. So each package is walked both in its `__path__` and in the folder pyproject maps it
to, and a name counts only if Python finds it."""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]
_CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _children(package: str) -> list[pkgutil.ModuleInfo]:
    folders = list(importlib.import_module(package).__path__)
    mapped = _CONFIG.get("package-dir", {}).get(package)
    if mapped is not None:
        folders.append(str(ROOT / mapped))
    return list(pkgutil.iter_modules(folders))


def packages() -> list[str]:
    """Every package pyproject.toml installs, plus any subpackage found inside one."""
    names = list(_CONFIG["packages"])
    for name in names:  # grows while it is walked: subpackages of subpackages
        names += [f"{name}.{info.name}" for info in _children(name)
                  if info.ispkg and f"{name}.{info.name}" not in names]
    return names


def modules() -> list[str]:
    """The dotted name of every installed package and module (`__main__` entry points left out:
    they run on import)."""
    names = []
    for package in packages():
        names.append(package)
        names += sorted({f"{package}.{info.name}" for info in _children(package)
                         if not info.ispkg and info.name != "__main__"})
    return [name for name in names if importlib.util.find_spec(name) is not None]


def source_file(name: str) -> Path:
    """Where the installed module `name` is read from (a wheel's copy or the editable mapping)."""
    return Path(importlib.util.find_spec(name).origin)
