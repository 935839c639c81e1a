"""Which model files may run code on this machine (the `trust_remote_code` rule of the ecosystem).

Data files (.safetensors, ONNX, a .pt read with weights_only=True) are parsed, never executed.
Code files — an AOTInductor `.pt2` (a shared library that is dlopen'ed) and TorchScript — run what
is inside them, so they load only when trusted: their SHA-256 is in the user's trust file (every
file `cfgengine export` writes is recorded there), or the caller says so (`trust_code=True`,
`--trust-code`). The check reads the file's bytes only; it runs before anything is loaded.

The trust file is `$CFGENGINE_TRUST_FILE`, else `$XDG_CONFIG_HOME/cfgengine/trusted.json`, else
`~/.config/cfgengine/trusted.json`: a JSON object {sha256: path it was written to}.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ENV = "CFGENGINE_TRUST_FILE"


def trust_file() -> Path:
    """Where this user's trusted hashes live (see the module docstring)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "cfgengine" / "trusted.json"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read() -> dict[str, str]:
    try:
        stored = json.loads(trust_file().read_text())
    except (OSError, ValueError):  # no trust file yet, or a damaged one: trust nothing from it
        return {}
    return stored if isinstance(stored, dict) else {}


def record(path: str | Path) -> str:
    """Add the file at `path` (just written by `cfgengine export`) to the trust file."""
    from cfgengine.atomic import write_atomic

    digest = file_sha256(path)
    stored = dict(_read(), **{digest: str(Path(path).resolve())})
    write_atomic(lambda tmp: Path(tmp).write_text(json.dumps(stored, indent=1)), trust_file())
    return digest


def is_trusted(path: str | Path) -> bool:
    """Whether the file's current bytes were recorded by `record`."""
    return file_sha256(path) in _read()


def check_trusted(path: str | Path, what: str, trust_code: bool = False) -> None:
    """ValueError (one line: why and how) unless `path` may run code: recorded, or trust_code."""
    if trust_code or is_trusted(path):
        return
    raise ValueError(f"{path}: refusing to load: {what} is code that runs when loaded, and this "
                     f"file was not written by `cfgengine export` on this machine (trust file "
                     f"{trust_file()}); if you trust its source, pass --trust-code "
                     "(trust_code=True)")
