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
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds.
    A symlink is written through (its target is replaced, the link stays); anything that exists
    and is not a regular file (a device, a FIFO, a folder) is refused. The result gets the
    mode of the file it replaces, else the user's umask (mkstemp alone would leave 0600)."""
    path = Path(os.path.realpath(path))
    _check_regular(path, str(path))
    mode = _output_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
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


def _output_mode(path: Path) -> int:
    """The permission bits a new output gets: the replaced file's, else 0o666 minus the umask."""
    if path.is_file():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _check_regular(path: Path, flag: str) -> None:
    if path.is_dir():
        raise ValueError(f"{flag}: {path} is a directory")
    if path.exists() and not path.is_file():
        raise ValueError(f"{flag}: {path} is not a regular file (a device or a pipe); cfgengine "
                         "writes outputs as whole files only")


def check_writable(path: str | Path, flag: str) -> None:
    """ValueError unless `path` can be created as a regular file: its directory exists and is
    writable, and it is not a directory, device or pipe (a symlink is checked at its target)."""
    path = Path(os.path.realpath(path))
    _check_regular(path, flag)
    if not path.parent.is_dir():
        raise ValueError(f"{flag}: directory of {path} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: directory {path.parent} is not writable")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (through symlinks and hard links; also when neither
    exists yet but both resolve to one path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(outputs: dict[str, str | Path | None],
                   inputs: dict[str, str | Path | None] | None = None) -> None:
    """ValueError unless every output (flag → path) is a different file from every input and
    from every other output: writing one must never destroy another."""
    outs = [(flag, p) for flag, p in outputs.items() if p is not None]
    ins = [(flag, p) for flag, p in (inputs or {}).items() if p is not None]
    for i, (flag, path) in enumerate(outs):
        for other, other_path in outs[i + 1:] + ins:
            if same_file(path, other_path):
                raise ValueError(f"{flag} {path} is the same file as {other} {other_path}; "
                                 "an output must not overwrite an input or another output")


def write_atomic(write: Callable[[str], Any], path: str | Path) -> Path:
    """Run `write(tmp)` on a temporary file beside `path`, then rename it over `path`: a kill
    mid-write leaves the previous file intact (os.replace is atomic within one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".tmp") as tmp:
        write(tmp)
    return path
