"""Model names, files and folders → what `cfgengine.sample` runs (`cfgengine.load`): the built-in
models (`default`, `default-distilled`, `gmm`), cfgengine's own weight files, exported artifacts,
and diffusers pipeline folders (cfgengine/adapters.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from cfgengine import adapters, hub, toy
from cfgengine.families import sd3, text
from cfgengine.checkpoint import (ASSETS, EMA_FORMAT, build_unet, read_checkpoint,
                                  read_safetensors, require_keys)
from cfgengine.unet import UNet


def _load_pt(path: Path) -> UNet:
    contents = require_keys(read_checkpoint(path), ("model_config", "dataset", "ema"), path)
    return build_unet(contents["model_config"], contents["dataset"], contents["ema"], path)


def _load_safetensors(path: Path) -> UNet:
    weights, meta = read_safetensors(path, EMA_FORMAT, ("model_config", "dataset"))
    return build_unet(meta["model_config"], meta["dataset"], weights, path)


# exported formats that are native code (DESIGN: data vs code files): each loads only when
# trusted, checked by its loader on the very bytes it loads (cfgengine.trust)
CODE_SUFFIXES = (".pt2", ".plan", ".engine")


def _load_exported(path: Path, trust_code: bool = False):
    from cfgengine import export  # lazy: onnx / onnxruntime are optional

    if path.suffix in CODE_SUFFIXES:
        return export.load(path, trust_code=trust_code)
    return export.load(path)


BUILTINS: dict[str, Callable[[], Any]] = {
    "gmm": toy.ring_mixture,
    "default": lambda: _load_safetensors(ASSETS / "default.safetensors"),
    # `default` guidance-distilled (scripts/distill_default.sh): net(z, logsnr, labels, w)
    "default-distilled": lambda: _load_safetensors(ASSETS / "default-distilled.safetensors"),
}
LOADERS: dict[str, Callable[[Path], Any]] = {
    ".pt": _load_pt, ".safetensors": _load_safetensors,
    **dict.fromkeys((".onnx", ".pt2", ".plan", ".engine"), _load_exported),
}


def load(model: str | Path, *, trust_code: bool = False, schedule: str = "consistent"):
    """A built-in name (`default`, `default-distilled`, `gmm`), a model file, a diffusers pipeline
    folder or a Hugging Face hub id (`org/name`, cfgengine/hub.py) → what `cfgengine.sample` runs:
    a UNet in eval mode with EMA weights for .pt / .safetensors, a backend for exported .onnx /
    .pt2 / .plan, a DiffusersDenoiser for a folder with model_index.json, a TextDenoiser or an
    SD3Denoiser (which take prompts) for a Stable Diffusion or SD3 folder (`schedule`:
    "consistent" or "pipeline", adapters.TimestepSchedule).
    `.pt2` and `.plan` files are code: they load only if trusted (`cfgengine.trust`) or with
    `trust_code=True`."""
    name = str(model)
    if name in BUILTINS:
        return BUILTINS[name]()
    path = Path(name)
    if not path.exists() and hub.is_hub_id(name):
        path = hub.snapshot(name)
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file, and not a built-in model "
                                f"({', '.join(BUILTINS)})")
    if sd3.is_sd3_folder(path):
        return sd3.load_folder(path, schedule=schedule)
    if text.is_text_folder(path):
        return text.load_folder(path, schedule=schedule)
    if adapters.is_pipeline_folder(path):
        return adapters.load_folder(path, schedule=schedule)
    if path.is_dir():
        raise ValueError(f"{name}: a folder, but not a diffusers pipeline (no model_index.json)")
    if path.suffix not in LOADERS:
        raise ValueError(f"{name}: not a model file cfgengine can read ({', '.join(LOADERS)})")
    if LOADERS[path.suffix] is _load_exported:
        return _load_exported(path, trust_code)
    return LOADERS[path.suffix](path)
