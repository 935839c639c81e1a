"""What a model's outputs are derived from, as one digest: the ONNX Runtime cache key and the
torchrun start vote both use it (docs/trust.md, "What is checked, when, against what").

`derivation(model)` lists the weights (tensor bytes, `weights_sha256`), the model's class and the
source of every module class in its tree, the settings its forward depends on, and its
conditioning path. The settings are what the model states — `ModelInfo.config` (cfgengine.model),
e.g. a diffusers adapter's prediction_type and its net's config, a UNet's UNetConfig — and, as
the safe fallback for a model that states none, every module's plain attributes (numbers,
strings, containers and dataclasses of them, unregistered tensors by their bytes): a setting that
changes forward changes the digest even when nobody declared it.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import os
import zlib
from pathlib import Path

import torch

from cfgengine.model import info

DEPTH = 6  # nested containers followed before a value is recorded by its type alone
_MODULE_INTERNALS = frozenset(torch.nn.Module().__dict__) | {"training"}


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes): the same weights hash the same
    whether they came from a ckpt.pt or a .safetensors file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(_bytes(t))
    return digest.hexdigest()


def _bytes(t: torch.Tensor):
    # reshape first: a 0-d tensor (BatchNorm's step counter) cannot be viewed as bytes
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer as it is now (re-read on each call: `p.data = …` and
    `load_state_dict(assign=True)` put new tensors in place of the old ones)."""
    return [*model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False)]


def fingerprint(modules: list[torch.nn.Module]) -> list[tuple]:
    """Which tensors `modules` (a model's `modules()`, listed once) hold and their in-place
    version counters: ≈ 0.1 ms for a few hundred tensors, equal only while no tensor was
    replaced (`p.data = …`, `load_state_dict(assign=True)`) or changed through itself (writes
    through `.data` bypass the counters: see `content_crc`)."""
    return [(id(t), t.data_ptr(), t._version) for m in modules
            for table in (m._parameters, m._buffers) for t in table.values() if t is not None]


def content_crc(model: torch.nn.Module) -> int:
    """CRC-32 over every tensor's bytes (≈ 1.5 GB/s on one core, several times cheaper than
    SHA-256): catches the writes a fingerprint cannot see."""
    crc = 0
    for _, t in tensors(model):
        crc = zlib.crc32(_bytes(t), crc)
    return crc


def settings(model) -> dict:
    """What a model's forward depends on besides its tensors' bytes and its code (cheap)."""
    facts = info(model)
    cls = type(model)
    parts = dict(cls=f"{cls.__module__}.{cls.__qualname__}", config=plain(facts.config),
                 conditioning=facts.conditioning, guidance_embedded=facts.guidance_embedded,
                 num_classes=facts.num_classes, sample_shape=list(facts.sample_shape))
    if not facts.config and isinstance(model, torch.nn.Module):
        parts.update(attributes=_attributes(model))  # nothing stated: everything plain
    return parts


def derivation(model) -> dict:
    """Everything a model's outputs are derived from, JSON-able (see the module docstring)."""
    parts = settings(model)
    if isinstance(model, torch.nn.Module):
        parts.update(weights=weights_sha256(model), code=_code(model))
    return parts


def content_check(model: torch.nn.Module) -> tuple[int, str]:
    """A cheap stand-in for `derivation` between its full computations: the tensors' CRC-32 and
    the digest of the settings (an attribute such as prediction_type edited in place)."""
    return content_crc(model), digest(settings(model))


def digest(parts: dict) -> str:
    """SHA-256 of a JSON-able record (keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _code(model: torch.nn.Module) -> dict[str, str | None]:
    """SHA-256 of the source file of every module class in the tree (a library upgrade or an
    edited model file changes the graph as surely as the weights do)."""
    classes = {type(m) for m in model.modules()}
    return {f"{c.__module__}.{c.__qualname__}": _source_sha256(c) for c in classes}


def _source_sha256(cls) -> str | None:
    import inspect

    try:
        path = inspect.getsourcefile(cls)
    except TypeError:  # a built-in class
        return None
    if path is None or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    return _file_sha256(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=512)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _attributes(model: torch.nn.Module) -> dict:
    """Each module's own plain attributes (not its parameters, buffers or submodules)."""
    return {name or "<root>": {k: plain(v) for k, v in sorted(vars(m).items())
                               if k not in _MODULE_INTERNALS}
            for name, m in model.named_modules(remove_duplicate=False)}


def plain(value, depth: int = DEPTH):
    """`value` as JSON-able data: numbers, strings and containers as they are, dataclasses as
    dicts, tensors by their bytes' SHA-256, anything else by its type (never by its address)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape),
                hashlib.sha256(_bytes(value)).hexdigest()]
    if isinstance(value, (torch.dtype, torch.device, enum.Enum)):
        return str(value)
    if depth > 0 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if depth > 0 and isinstance(value, dict):
        return {str(k): plain(v, depth - 1) for k, v in value.items()}
    if depth > 0 and isinstance(value, (list, tuple, set, frozenset)):
        items = [plain(v, depth - 1) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, torch.nn.Module):
        return None  # a submodule: covered by its own entry in the tree
    kind = type(value)
    return f"<{kind.__module__}.{kind.__qualname__}>"
