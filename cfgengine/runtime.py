"""Backends: what computes eps2 = backend(z[B], λ[B], labels[B]) for the sampler (docs/design.md §3).

`torch` runs the GuidedDenoiser eagerly, `compile` runs it through torch.compile, `onnxruntime`
runs it as an ONNX graph exported on first use and cached (cfgengine/backends/onnxruntime.py), and
`cudagraph` captures the whole step (net forward on a static [2B] buffer + the fused step kernel)
as a CUDA graph (cfgengine/cudagraph.py). `auto` is cudagraph on CUDA; on CPU it is onnxruntime
when onnxruntime imports, the model is a torch module and the precision fp32, else torch.
Exported files (.onnx, .pt2, .plan) load as backends of their own.
"""
from __future__ import annotations

import torch

from cfgengine.guidance import GuidedDenoiser
from cfgengine.precision import PRECISIONS

BACKENDS = ("auto", "torch", "compile", "onnxruntime", "cudagraph")


def check_backend(name: str | None, model, device: torch.device, precision: str = "fp32") -> str:
    """The backend that will run `model` on `device` at `precision`; ValueError when it cannot."""
    name = name or "auto"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    exported = getattr(model, "backend_name", None)
    if exported is not None:
        if name not in ("auto", exported):
            raise ValueError(f"this model is an exported {exported} file; it runs only on "
                             f"backend {exported}")
        return exported
    module = isinstance(model, torch.nn.Module)
    if name == "auto":
        if device.type == "cuda":
            return "cudagraph" if module else "torch"
        return "onnxruntime" if module and _onnxruntime_pays(precision) else "torch"
    if name == "onnxruntime" and not module:
        raise ValueError("backend onnxruntime exports the model: it needs a torch nn.Module")
    if name == "onnxruntime" and precision == "bf16":
        raise ValueError("backend onnxruntime has no bf16 kernels; use --precision fp32 or fp16")
    if name == "cudagraph" and device.type != "cuda":
        raise ValueError("backend cudagraph needs a CUDA device (--device cuda)")
    if name == "cudagraph" and not isinstance(model, torch.nn.Module):
        raise ValueError("backend cudagraph needs a torch nn.Module model")
    return name


def _onnxruntime_pays(precision: str) -> bool:
    """Whether auto may pick ONNX Runtime on CPU: installed, and a precision it runs fast."""
    from cfgengine.backends import onnxruntime

    return precision in onnxruntime.AUTO_PRECISIONS and onnxruntime.available()


def check_device(device: torch.device | str | None, model) -> torch.device:
    """The device to sample on (default: the model's); ValueError when it is not usable here."""
    if device is None:
        return model_device(model)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"not a device: {device!r} (try cpu or cuda)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested, but this torch has no usable CUDA")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} requested, but there are only "
                             f"{torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"device {device} is not supported (cpu or cuda)")
    return device


def check_precision(precision: str | None, model) -> str:
    """The network precision; an exported file runs at the precision it was exported with."""
    exported = getattr(model, "backend_name", None)
    if exported is not None:
        if precision not in (None, model.precision):
            raise ValueError(f"this {exported} file holds {model.precision} weights; export it "
                             f"again with --precision {precision} instead")
        return model.precision
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def split_model(model, backend: str, precision: str = "fp32",
                device: torch.device | None = None, auto: bool = False):
    """(doubled-batch callable, plain B-row net or None) for a Denoiser or an exported backend."""
    if getattr(model, "returns_doubled", False):
        return model, getattr(model, "denoiser", None)
    if backend == "onnxruntime":
        from cfgengine.backends.onnxruntime import OnnxRuntimeDenoiser

        guided = OnnxRuntimeDenoiser(model, precision, device or model_device(model), auto)
        return guided, guided.denoiser
    guided = GuidedDenoiser(model)
    if backend == "compile":
        return torch.compile(guided), torch.compile(model)
    return guided, model


def move_model(model, device: torch.device):
    """Put a Denoiser on `device` (in place for nn.Modules, as `module.to` does)."""
    to = getattr(model, "to", None)
    return to(device) if to is not None else model


def model_device(model) -> torch.device:
    """The device of a model's first parameter or buffer, else the CPU."""
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device(getattr(model, "device", "cpu"))
