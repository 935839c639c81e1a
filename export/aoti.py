"""AOTInductor export: the traced denoiser compiled ahead of time into a `.pt2` package
(`torch._inductor.aoti_compile_and_package`), loaded with `torch._inductor.aoti_load_package`.

Our metadata JSON rides in the package's own metadata (`aot_inductor.metadata`), which the loader
returns from `get_metadata()`, so the `.pt2` is one self-describing file. A package runs only on
the device type it was compiled for.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cfgengine.export import metadata
from cfgengine.export.artifact import Backend
from cfgengine.export.program import Traced, trace
from cfgengine.atomic import atomic_path

SUPPORTED_PRECISIONS = ("fp32", "fp16", "bf16")
_DEVICE_KEY = "AOTI_DEVICE_KEY"  # written by AOTInductor itself: "cpu" or "cuda"


def export(model: torch.nn.Module, path: str | Path, *, precision: str = "fp32",
           max_batch: int = 64, device: torch.device | str = "cpu",
           source: str | None = None) -> Path:
    """Compile `model` for `device` into a `.pt2` at `path` (atomically)."""
    metadata.export_dtype(precision, SUPPORTED_PRECISIONS, "AOTInductor")
    traced = trace(model, precision=precision, max_batch=max_batch, device=device, source=source)
    return export_program(traced, path)


def export_program(traced: Traced, path: str | Path) -> Path:
    """Compile an already traced program into a `.pt2` package with our metadata."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"{path}: an AOTInductor package must be named *.pt2")
    configs = {"aot_inductor.metadata": {metadata.KEY: traced.meta.to_json()}}
    with atomic_path(path, ".pt2") as tmp:
        torch._inductor.aoti_compile_and_package(traced.program, package_path=tmp,
                                                 inductor_configs=configs)
    return path


def load(path: str | Path, *, device: torch.device | str | None = None) -> "AotiBackend":
    """The backend of a cfgengine `.pt2`; `device` defaults to (and must match) the package's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        compiled = torch._inductor.aoti_load_package(str(path))
        stored = compiled.get_metadata()
    except Exception as err:  # zipfile, RuntimeError from the loader: all mean "not a package"
        raise ValueError(f"{path}: not a loadable AOTInductor package "
                         f"({type(err).__name__})") from err
    meta = metadata.parse(stored.get(metadata.KEY), path)
    return AotiBackend(meta, path, _device(stored.get(_DEVICE_KEY, "cpu"), device, path), compiled)


def _device(built_for: str, asked: torch.device | str | None, path: Path) -> torch.device:
    asked = torch.device(built_for if asked is None else asked)
    if asked.type != built_for:
        raise ValueError(f"{path}: compiled for {built_for}, cannot run on {asked.type}; "
                         f"re-export with --device {asked.type}")
    return asked


class AotiBackend(Backend):
    """The backend contract on an AOTInductor-compiled package."""

    backend_name = "aoti"

    def __init__(self, meta: metadata.ExportMeta, path: Path, device: torch.device, compiled):
        super().__init__(meta, path, device)
        self.compiled = compiled

    def run(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.compiled(z, logsnr, labels)  # (rows, *S)
