"""precision="int8" on the CPU: the model's statically quantized ONNX graph (export/quantize.py)
on ONNX Runtime, made on first use and cached like the fp32 graph. The step stays fp32: the
graph takes and returns fp32 (its int8 work is inside, between QuantizeLinear/DequantizeLinear).
"""
from __future__ import annotations

from pathlib import Path

import torch

from cfgengine.export import quantize
from cfgengine.backends.onnxruntime import KEY_PROP, OnnxRuntimeDenoiser, available, cache_key, \
    session


def check_backend(name: str, module: bool, device: torch.device) -> str:
    """The backend of precision int8 (its ONNX Runtime graph); ValueError where it cannot run."""
    if device.type != "cpu":
        raise ValueError("precision int8 runs on the CPU only (its ONNX Runtime graph); use "
                         "--precision fp16 or bf16 on CUDA")
    if name not in ("auto", "onnxruntime"):
        raise ValueError(f"precision int8 runs a quantized ONNX graph: use backend auto or "
                         f"onnxruntime, not {name}")
    if not module:
        raise ValueError("precision int8 quantizes the model's graph: it needs a torch nn.Module")
    if not available():
        raise ValueError("precision int8 needs onnxruntime, onnx and onnxscript "
                         "(pip install 'cfgengine[onnx]')")
    return "onnxruntime"


class Int8Denoiser(OnnxRuntimeDenoiser):
    """Rows in, rows out (z[N], λ[N], labels[N]) → ε[N] on the int8 graph of `model`, calibrated
    by `calibration`. Always the graph (never an eager
    fallback under auto: int8 was asked for); a failure to build it is one ValueError line."""

    def __init__(self, model: torch.nn.Module, device: torch.device, sample,
                 calibration: quantize.Calibration = quantize.Calibration()):
        super().__init__(model, "int8", device, auto=False)
        self.calibration, self.sample = calibration, sample  # `sample`: cfgengine.sample

    def key(self, check_content: bool = False) -> str:
        """The int8 graph's key: the model's own key (its weights, config and code; see
        OnnxRuntimeDenoiser.key) with the calibration settings and the quantizer's version."""
        return quantize.cache_key(super().key(check_content), self.calibration)

    def graph(self) -> Path:
        """The cached int8 graph's path, made now (from the cached fp32 graph) when missing."""
        return self._session().path

    def _write(self, path: Path, key: str) -> Path:
        """Quantize the model's fp32 graph (cached as any fp32 graph) into `path`, recording
        `key`."""
        fp32_key = cache_key(self.model, "fp32", self.sample_shape)
        fp32 = session(self.model, "fp32", torch.device("cpu"), fp32_key, self._weights,
                       path.parent).path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot write the int8 graph to {path.parent} ({err.strerror}); "
                             "set CFGENGINE_CACHE_DIR to a writable folder") from None
        return quantize.quantize(self.model, fp32, path, self.calibration, self.sample,
                                 props={KEY_PROP: key})
