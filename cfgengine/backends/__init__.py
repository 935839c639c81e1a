"""Backends: what runs a model's network for the sampler (docs/design.md §3.4). Every backend is a
denoiser in the sense of cfgengine.model — rows in, rows out — and `prepare` makes a model ready to
sample once, for the Sampler and the server alike (`Prepared`: its facts, the net, device,
precision; `Prepared.eps` builds the doubled batch of a guided step).

`torch` runs the model eagerly, `compile` through torch.compile, `onnxruntime` as an ONNX graph
exported on first use and cached (cfgengine/backends/onnxruntime.py), and `cudagraph` captures the
whole step (net forward on a static [2B] buffer + the fused step kernel) as a CUDA graph
(cfgengine/cudagraph.py). `auto` is cudagraph on CUDA; on CPU it is onnxruntime when onnxruntime
imports, the model is a torch module and the precision fp32, else torch. Exported files (.onnx,
.pt2, .plan) load as backends of their own and run only on themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cfgengine import cpu
from cfgengine.guidance import doubled_batch, null_labels
from cfgengine.model import ModelInfo, info
from cfgengine.precision import PRECISIONS, autocast_dtype

BACKENDS = ("auto", "torch", "compile", "onnxruntime", "cudagraph")


# one ONNX protobuf holds under 2 GiB and the cached graphs carry no external data: a bigger net
# (a real Stable Diffusion UNet or SD3 transformer in fp32) stays on torch under auto
ONNX_WEIGHT_LIMIT = 2 * 1024**3 - 128 * 1024**2


def check_backend(name: str | None, facts: ModelInfo, module: bool, device: torch.device,
                  precision: str = "fp32", weight_bytes: int = 0) -> str:
    """The backend that will run a model (`facts`; `module`: a torch nn.Module of
    `weight_bytes` parameter and buffer bytes) on `device` at `precision`; ValueError when it
    cannot."""
    name = name or "auto"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if facts.exported:
        if name not in ("auto", facts.backend):
            raise ValueError(f"this model is an exported {facts.backend} file; it runs only on "
                             f"backend {facts.backend}")
        return facts.backend
    if device.type == "cpu":
        cpu.check_precision(precision)  # refuses int8 / warns bf16 where the CPU cannot
    if facts.conditioning != "class":  # the CUDA graph's buffers and int8 calibration take labels
        _check_prompt_backend(name, precision)
    if precision == "int8":
        from cfgengine.backends import quantized

        return quantized.check_backend(name, module, device)
    if name == "cudagraph" and facts.guidance_embedded:
        raise ValueError("backend cudagraph does not run guidance-distilled models yet; use "
                         "backend torch or compile")
    if name == "auto":
        # the captured graph takes neither w nor prompt rows; the cached ONNX graphs take both
        if device.type == "cuda":
            capturable = module and facts.conditioning == "class" and not facts.guidance_embedded
            return "cudagraph" if capturable else "torch"
        fits = weight_bytes < ONNX_WEIGHT_LIMIT
        return "onnxruntime" if module and fits and _onnxruntime_pays(precision) else "torch"
    if name == "onnxruntime" and not module:
        raise ValueError("backend onnxruntime exports the model: it needs a torch nn.Module")
    if name == "onnxruntime" and weight_bytes >= ONNX_WEIGHT_LIMIT:
        raise ValueError(f"backend onnxruntime caches one ONNX file per model, under 2 GiB; "
                         f"this one has {weight_bytes / 1024**3:.1f} GiB of weights: use backend "
                         "torch or compile")
    if name == "onnxruntime" and precision == "bf16":
        raise ValueError("backend onnxruntime has no bf16 kernels; use --precision fp32 or fp16")
    if name == "cudagraph" and device.type != "cuda":
        raise ValueError("backend cudagraph needs a CUDA device (--device cuda)")
    if name == "cudagraph" and not module:
        raise ValueError("backend cudagraph needs a torch nn.Module model")
    return name


def _check_prompt_backend(name: str, precision: str) -> None:
    """ValueError for the backends and precisions that do not run prompt-conditioned models."""
    if name == "cudagraph":
        raise ValueError(f"backend {name} does not run prompt-conditioned models yet; use "
                         "backend torch or compile")
    if precision == "int8":
        raise ValueError("precision int8 does not run prompt-conditioned models yet; use fp32, "
                         "bf16 or fp16")


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


def check_precision(precision: str | None, facts: ModelInfo) -> str:
    """The network precision; an exported file runs at the precision it was exported with."""
    if facts.exported:
        if precision not in (None, facts.precision):
            raise ValueError(f"this {facts.backend} file holds {facts.precision} weights; export "
                             f"it again with --precision {precision} instead")
        return facts.precision
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


@dataclass
class Prepared:
    """A model made ready to sample, shared by the Sampler and the server: its facts, the net
    that computes ε for every row it is given (rows in = rows out), and where and how it runs.
    `eps` builds the doubled batch (one forward of 2B rows) where a step is guided."""

    info: ModelInfo
    net: Callable
    backend: str
    device: torch.device
    precision: str
    autocast_dtype: torch.dtype | None

    def eps(self, z: torch.Tensor, logsnr: torch.Tensor, cond, doubled: bool, null=None,
            w: torch.Tensor | None = None) -> torch.Tensor:
        """ε of the B rows, or of the doubled batch (conditional rows, then the `null` rows: the
        null label by default). A guidance-embedded net takes w and answers ε̃_w in B rows."""
        if doubled:
            null = null_labels(cond, self.info.null_label) if null is None else null
            z, logsnr, cond = doubled_batch(z, logsnr, cond, null)
        extra = (w,) if self.info.guidance_embedded else ()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            return check_rows(self.net(z, logsnr, cond, *extra), z.shape[0], self.info.name)

    def announce(self, rows: int, steps: int) -> None:
        """A sampling call of `rows` × `steps` forwards is coming (ONNX Runtime exports only when
        the work pays for it)."""
        if isinstance(self.net, onnxruntime_denoiser()):
            self.net.plan(rows=rows, steps=steps)

    def warm(self) -> None:
        """Export (or load) an ONNX Runtime session now, whatever the size of the next call."""
        if isinstance(self.net, onnxruntime_denoiser()):
            self.net.warm()

    @property
    def runtime(self) -> str:
        """What ran the last forward (auto on CPU may have run eager torch)."""
        return self.net.runtime if isinstance(self.net, onnxruntime_denoiser()) else self.backend


def prepare(model, *, device=None, backend: str | None = None, precision: str | None = None,
            facts: ModelInfo | None = None, sample=None) -> Prepared:
    """`model` ready to sample on `device` with `backend` at `precision` (each checked, one-line
    ValueError otherwise); the model is moved there (in place for nn.Modules, like `.to`).
    `sample` (cfgengine.sample, passed by the layer above) calibrates int8 graphs."""
    facts = facts or info(model)
    module = isinstance(model, torch.nn.Module)
    device = check_device(device, model)
    precision = check_precision(precision, facts)
    name = check_backend(backend, facts, module, device, precision,
                         weight_bytes=_weight_bytes(model, precision) if module else 0)
    model = move_model(model, device)
    runs_own_precision = facts.exported or name == "onnxruntime"
    dtype = None if runs_own_precision else autocast_dtype(precision)
    if name == "onnxruntime" and precision == "int8":
        from cfgengine.backends.quantized import Int8Denoiser

        if sample is None:
            raise ValueError("precision int8 calibrates on the model's own sampling: prepare "
                             "it through cfgengine.Sampler")
        net = Int8Denoiser(model, device, sample)
    elif name == "onnxruntime":
        net = onnxruntime_denoiser()(model, precision, device, backend in (None, "auto"))
    elif name == "compile":
        net = torch.compile(model)
    else:
        net = model
    return Prepared(facts, net, name, device, precision, dtype)


def _weight_bytes(model: torch.nn.Module, precision: str) -> int:
    """Bytes of the parameters and buffers an export at `precision` would hold (shared tensors
    once; the export casts them: 2 bytes at fp16/bf16, else 4 — int8 quantizes an fp32 graph)."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() for t in tensors.values()) * (2 if precision in ("fp16", "bf16") else 4)


def onnxruntime_denoiser():
    """The ONNX Runtime session backend's class (imported on first use: onnx is an extra)."""
    from cfgengine.backends.onnxruntime import OnnxRuntimeDenoiser

    return OnnxRuntimeDenoiser


def check_rows(eps: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """eps if it has `rows` rows (shape metadata: no sync); a B-row answer where 2B are due
    would make every guided step silently unguided."""
    if eps.shape[0] != rows:
        raise ValueError(f"{name}: returned {eps.shape[0]} rows where {rows} are due (a denoiser "
                         "returns one row of ε per input row)")
    return eps


def move_model(model, device: torch.device):
    """Put a Denoiser on `device` (in place for nn.Modules, as `module.to` does)."""
    to = getattr(model, "to", None)
    return to(device) if callable(to) else model


def model_device(model) -> torch.device:
    """The device of a model's first parameter or buffer, else the CPU."""
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device(getattr(model, "device", "cpu"))
