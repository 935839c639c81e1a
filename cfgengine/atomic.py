"""Atomic file writes: outputs appear whole or not at all (a kill or an error mid-write leaves the
previous file, or nothing, in place — never a half-written file)."""
from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_paths(*paths: str | Path | None):
    """`atomic_path` for several outputs at once (None entries stay None): if any write fails,
    none of the outputs appears."""
    with ExitStack() as stack:
        yield [None if p is None else stack.enter_context(atomic_path(p, Path(p).suffix))
               for p in paths]


def check_writable(path: str | Path, flag: str) -> None:
    """ValueError unless `path` can be created as a file (its directory exists, it is no dir)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag}: {path} is a directory")
    if not path.resolve().parent.is_dir():
        raise ValueError(f"{flag}: directory of {path} does not exist")


def write_atomic(write: Callable[[str], Any], path: str | Path) -> Path:
    """Run `write(tmp)` on a temporary file beside `path`, then rename it over `path`: a kill
    mid-write leaves the previous file intact (os.replace is atomic within one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".tmp") as tmp:
        write(tmp)
    return path
