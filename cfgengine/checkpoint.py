"""The files cfgengine writes and reads: training checkpoints, EMA weights, classifier weights.

- `ckpt.pt`: a dict of tensors and plain values (format, version, configs, model, EMA, optimizer, step,
  RNG states), readable with `torch.load(weights_only=True)`; always written atomically.
- `*.safetensors`: EMA weights only, with the UNet config and dataset description as JSON in the
  header metadata — the shipping format (the embedded `default` model is one).
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from cfgengine.atomic import write_atomic
from cfgengine.unet import UNet, UNetConfig

FORMAT = "cfgengine-ckpt"
EMA_FORMAT = "cfgengine-ema"
VERSION = 1
ASSETS = Path(__file__).parent / "assets"  # the embedded model and classifiers


def save_checkpoint(contents: dict, path: str | Path) -> Path:
    """Write a training checkpoint (`contents` plus format and version) atomically; OSError in
    one line if the write fails (disk full: torch says "unexpected pos"), the old file kept."""
    payload = {"format": FORMAT, "version": VERSION, **contents}
    try:
        return write_atomic(lambda tmp: torch.save(payload, tmp), path)
    except (RuntimeError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise OSError(f"{path}: could not write the checkpoint (disk full?): {first}; the "
                      "previous checkpoint, if any, is unchanged") from err


def require_keys(contents: dict, keys: tuple[str, ...], path: str | Path) -> dict:
    """`contents` if it has every key in `keys`; ValueError naming the missing ones."""
    missing = [k for k in keys if k not in contents]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)} (damaged or edited)")
    return contents


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's dict, loaded with weights_only=True; ValueError naming the path if it is
    truncated, foreign or of another format version."""
    path = _existing(path)
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file; all mean the same here
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                         f"{type(err).__name__}") from err
    _check_format(contents, path, FORMAT)
    return contents


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    return path


def _check_format(contents: Any, path: Path, expected: str) -> None:
    if not isinstance(contents, dict) or contents.get("format") != expected:
        raise ValueError(f"{path}: not a cfgengine {expected} file")
    if str(contents.get("version")) != str(VERSION):
        raise ValueError(f"{path}: format version {contents.get('version')}, this cfgengine reads "
                         f"version {VERSION}")


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, file_format: str,
                      **metadata: Any) -> Path:
    """Write tensors + JSON-encoded `metadata` (with format and version) atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": file_format, "version": str(VERSION),
              **{k: json.dumps(v) for k, v in metadata.items()}}
    return write_atomic(lambda tmp: save_file(tensors, tmp, metadata=header), path)


def read_safetensors(path: str | Path, file_format: str,
                     keys: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, decoded metadata `keys`) of a file written by `write_safetensors`; ValueError
    naming the path if it is truncated, foreign, of another version or lacks a key."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors' own error types for a damaged header or body
        raise ValueError(f"{path}: not a readable .safetensors file (truncated or corrupt?): "
                         f"{type(err).__name__}") from err
    _check_format(header, path, file_format)
    try:
        return tensors, {k: json.loads(header[k]) for k in keys}
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: metadata lacks a valid {err}") from err


def save_ema_weights(ema: dict[str, torch.Tensor], model_config: dict, dataset: dict,
                       path: str | Path) -> Path:
    """EMA weights + the UNet config and dataset as metadata: the shipping format."""
    return write_safetensors(ema, path, EMA_FORMAT, model_config=model_config, dataset=dataset)


def ema_weights_of(ckpt: str | Path, path: str | Path) -> Path:
    """A ckpt.pt's EMA weights → a .safetensors file."""
    contents = read_checkpoint(ckpt)
    return save_ema_weights(contents["ema"], contents["model_config"], contents["dataset"], path)


def build_unet(model_config: dict, dataset: dict, weights: dict[str, torch.Tensor],
               source: str | Path) -> UNet:
    """A UNet from a stored config and weights, in eval mode with gradients off, carrying the
    dataset's `class_names` and `dataset` name."""
    names = {f.name for f in fields(UNetConfig)}
    _check_stored_types(model_config, dataset, weights, source)
    if not set(model_config) <= names:
        raise ValueError(f"{source}: unknown model settings {sorted(set(model_config) - names)}")
    try:
        config = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in model_config.items()})
        net = UNet(config)
    except (TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
        raise ValueError(f"{source}: stored model config is not valid ({type(err).__name__})") from err
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{source}: weights do not match the stored model config") from err
    net.class_names = tuple(dataset.get("class_names", ()))
    net.dataset = dataset.get("name", "")
    return net.eval().requires_grad_(False)


def _check_stored_types(model_config, dataset, weights, source) -> None:
    """ValueError unless the stored config and dataset are JSON objects of the expected kinds
    (edited metadata would otherwise surface as AttributeError / IndexError)."""
    if not isinstance(model_config, dict) or not isinstance(dataset, dict):
        raise ValueError(f"{source}: model_config and dataset must be JSON objects")
    names = dataset.get("class_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{source}: dataset class_names must be a list of strings")
    if not isinstance(dataset.get("name", ""), str):
        raise ValueError(f"{source}: dataset name must be a string")
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor)
                                                for t in weights.values()):
        raise ValueError(f"{source}: weights must be a dict of tensors")


def dataset_dict(info) -> dict:
    """A DatasetInfo as the plain dict stored in checkpoints and metadata."""
    return {"name": info.name, "class_names": list(info.class_names), "shape": list(info.shape)}


def config_dict(config) -> dict:
    """A config dataclass as plain values (tuples become lists, as JSON would make them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
