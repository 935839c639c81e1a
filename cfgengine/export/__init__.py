"""Exported artifacts of a guided denoiser: ONNX (`.onnx`), AOTInductor (`.pt2`) and TensorRT
(`.plan` / `.engine`, experimental). Each format module has `export(model, path, ...)` and
`load(path) -> backend`; this package dispatches by format name and by file suffix.
Format modules are imported on first use: their dependencies (onnx, tensorrt) are optional extras.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from cfgengine.export.artifact import Backend

SUFFIXES = {"onnx": ".onnx", "aoti": ".pt2", "tensorrt": ".plan"}
FORMAT_OF_SUFFIX = {".onnx": "onnx", ".pt2": "aoti", ".plan": "tensorrt", ".engine": "tensorrt"}


def format_module(fmt: str) -> ModuleType:
    """The module implementing `fmt` (onnx, aoti, tensorrt)."""
    if fmt == "onnx":
        from cfgengine.export import onnx as module
    elif fmt == "aoti":
        from cfgengine.export import aoti as module
    elif fmt == "tensorrt":
        from cfgengine.export import tensorrt as module
    else:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(SUFFIXES)}")
    return module


def export(model: torch.nn.Module, path: str | Path, *, format: str, **options) -> Path:
    """Export `model` (the plain denoiser; its backend makes the doubled batch) to `path` in
    `format`; `options` go to that format's export
    (precision, max_batch, source, and device for aoti / tensorrt). ONNX at int8 is the fp32
    graph statically quantized (export/quantize.py)."""
    if format == "onnx" and options.get("precision") == "int8":
        from cfgengine.export import quantize

        options.pop("precision")
        return quantize.export_int8(model, path, **options)
    return format_module(format).export(model, path, **options)


def load(path: str | Path, **options) -> Backend:
    """A backend for an exported file, chosen by its suffix (.onnx, .pt2, .plan / .engine)."""
    path = Path(path)
    fmt = FORMAT_OF_SUFFIX.get(path.suffix)
    if fmt is None:
        raise ValueError(f"{path}: not an exported model (expected one of "
                         f"{', '.join(FORMAT_OF_SUFFIX)})")
    return format_module(fmt).load(path, **options)


__all__ = ["Backend", "SUFFIXES", "export", "format_module", "load"]
