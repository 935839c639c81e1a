"""Which model files may run code on this machine (the `trust_remote_code` rule of the ecosystem).

Data files (.safetensors, ONNX, a .pt read with weights_only=True) are parsed, never executed.
Code files — an AOTInductor `.pt2` (a shared library that is dlopen'ed), a TensorRT plan and
TorchScript — run what is inside them, so they load only when trusted: their SHA-256 is in the
user's trust file (every file `cfgengine export` writes is recorded there), or the caller says so
(`trust_code=True`, `--trust-code`). The bytes checked are the bytes loaded: the file is read
once, into memory or into a private (0700) temporary folder, hashed there, and only that copy is
loaded, so a file swapped at the path after the check is never run.

The trust file is `$CFGENGINE_TRUST_FILE`, else `$XDG_CONFIG_HOME/cfgengine/trusted.json`, else
`~/.config/cfgengine/trusted.json`: a JSON object {sha256: path it was written to}. It is refused
(one line) when others could have written it: writable by everyone, owned by another user, or in
a folder everyone may write without the sticky bit; and when it is not valid JSON (a damaged file
is an error, never read as empty nor overwritten). cfgengine-run (runner/trust.cpp) applies the
same rules to the same file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

ENV = "CFGENGINE_TRUST_FILE"
BLOCK = 1 << 20


def trust_file() -> Path:
    """Where this user's trusted hashes live (see the module docstring)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "cfgengine" / "trusted.json"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    with open(path, "rb") as f:
        return _copy_hashing(f, None)


def _copy_hashing(source: BinaryIO, target: BinaryIO | None) -> str:
    """SHA-256 of what is read from `source`, each block also written to `target`."""
    digest = hashlib.sha256()
    for block in iter(lambda: source.read(BLOCK), b""):
        digest.update(block)
        if target is not None:
            target.write(block)
    return digest.hexdigest()


def check_not_shared(path: Path) -> None:
    """ValueError unless only this user (or root) could have written `path` and its folder."""
    for where, what in ((path, "trust file"), (path.parent, "trust file's folder")):
        try:
            info = where.stat()
        except FileNotFoundError:
            continue
        if info.st_uid not in (os.getuid(), 0):
            raise ValueError(f"{path}: refusing the {what}: {where} belongs to another user")
        sticky_folder = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
        if info.st_mode & stat.S_IWOTH and not sticky_folder:
            raise ValueError(f"{path}: refusing the {what}: everyone may write {where} "
                             f"(chmod o-w {where})")


def trusted_hashes() -> dict[str, str]:
    """{sha256: path} of the trust file ({} when there is none); ValueError (one line naming the
    file) when it is damaged or others could have written it."""
    path = trust_file()
    check_not_shared(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the trust file ({err})") from None
    try:
        stored = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: damaged trust file, not valid JSON ({err}); fix or delete it "
                         "(it is never overwritten)") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: damaged trust file: not a JSON object {{sha256: path}}")
    return stored


def record(path: str | Path) -> str:
    """Add the file at `path` (just written by `cfgengine export`) to the trust file."""
    from cfgengine.atomic import write_atomic

    stored = trusted_hashes()  # a damaged or shared trust file stops here, untouched
    digest = file_sha256(path)
    stored[digest] = str(Path(path).resolve())
    write_atomic(lambda tmp: Path(tmp).write_text(json.dumps(stored, indent=1)), trust_file())
    return digest


def is_trusted(path: str | Path) -> bool:
    """Whether the file's current bytes were recorded by `record`."""
    return file_sha256(path) in trusted_hashes()


def _check_digest(digest: str, path: Path, what: str, trust_code: bool) -> None:
    """ValueError (one line: why and how) unless the bytes of `digest` may run code."""
    if trust_code or digest in trusted_hashes():
        return
    raise ValueError(f"{path}: refusing to load: {what} is code that runs when loaded, and this "
                     f"file was not written by `cfgengine export` on this machine (trust file "
                     f"{trust_file()}); if you trust its source, pass --trust-code "
                     "(trust_code=True)")


def check_bytes(data: bytes, path: str | Path, what: str, trust_code: bool = False) -> None:
    """ValueError unless `data`, read once from `path`, may run code; load only `data` after."""
    _check_digest(hashlib.sha256(data).hexdigest(), Path(path), what, trust_code)


@contextmanager
def trusted_copy(path: str | Path, what: str, trust_code: bool = False) -> Iterator[Path]:
    """A copy of `path` in a private temporary folder (mode 0700, removed afterwards), hashed as
    it was copied; ValueError unless those bytes may run code. Load the copy, never `path`."""
    path = Path(path)
    folder = tempfile.mkdtemp(prefix="cfgengine-trusted-")  # mkdtemp: 0700, a fresh name
    try:
        copy = Path(folder) / f"model{path.suffix}"
        with open(path, "rb") as source, open(copy, "xb") as target:
            digest = _copy_hashing(source, target)
        _check_digest(digest, path, what, trust_code)
        yield copy
    finally:
        shutil.rmtree(folder, ignore_errors=True)
