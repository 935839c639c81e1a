"""Model files and built-in names → ready Denoisers or backends (`cfgengine.load`)."""
from __future__ import annotations

from pathlib import Path

from cfgengine import toy

BUILTINS = {"gmm": toy.ring_mixture}


def load(model: str | Path):
    """A built-in name (`gmm`) or a model file → a Denoiser or backend usable by `cfgengine.sample`."""
    name = str(model)
    if name in BUILTINS:
        return BUILTINS[name]()
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file, and not a built-in model "
                                f"({', '.join(BUILTINS)})")
    raise ValueError(f"{name}: not a model file cfgengine can read")
