"""precision="int8" on the CPU: the model's statically quantized ONNX graph (export/quantize.py)
on ONNX Runtime, made on first use and cached like the fp32 graph. The step stays fp32: the
graph takes and returns fp32 (its int8 work is inside, between QuantizeLinear/DequantizeLinear).
"""
from __future__ import annotations

from pathlib import Path

import torch

from cfgengine.export import quantize
from cfgengine.backends.onnxruntime import MAX_BATCH, OnnxRuntimeDenoiser, available, cache_dir, \
    cache_key, cached, session


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

    def key(self) -> str:
        """The int8 graph's key: the model's own key (rehashed only after its weights change)
        with the calibration settings and the quantizer's version."""
        config = getattr(self.model, "config", None)  # ModelInfo's job once model.py lands
        return quantize.cache_key(super().key(), self.calibration, config)

    def _backend(self, shape: tuple[int, ...], batch: int):
        if shape == self.sample_shape and batch <= 2 * MAX_BATCH and not self._failed:
            try:
                self.graph()
            except Exception as err:  # exporter, calibration or quantizer: cannot run int8
                return self._fall_back(err)
        return super()._backend(shape, batch)

    def graph(self) -> Path:
        """The cached int8 graph's path, made now (from the cached fp32 graph) when missing."""
        key = self.key()
        path = cache_dir() / f"{key}.onnx"
        if cached(key):
            return path
        fp32_key = cache_key(self.model, "fp32", self.sample_shape)
        fp32 = session(self.model, "fp32", torch.device("cpu"), fp32_key).path
        try:
            cache_dir().mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot write the int8 graph to {cache_dir()} ({err.strerror}); "
                             "set CFGENGINE_CACHE_DIR to a writable folder") from None
        return quantize.quantize(self.model, fp32, path, self.calibration, self.sample)
