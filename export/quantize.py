"""int8: the plain denoiser's ONNX graph statically quantized (QDQ), weights per output channel,
activation ranges calibrated on the inputs the guided sampler itself feeds the network.

Calibration runs the fp32 model through `cfgengine.sample` at a few guidance strengths and records
every network call: the z_t the sampler visits over the whole λ range, both halves of the doubled
batch (class labels and the null label). The quantized graph is part of export and cached beside
the fp32 graph (`$CFGENGINE_CACHE_DIR/onnx/KEY.onnx`), keyed by the fp32 graph's own key (weights
digest, model class and source, sample shape, versions) plus the calibration settings, the
quantizer's options and the onnxruntime version.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np
import torch

from cfgengine.export.program import INPUTS
from cfgengine.logs import quiet_logger

FORMAT = 1  # bump when the quantizer's recipe changes: old int8 graphs are then re-made
# only the weighted ops: quantizing the norms, SiLU and the λ embedding as well raised the default
# model's ε error on its own trajectories from 4 % to 29 % (relative L2, mean over calls)
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Calibration:
    """How activation ranges are calibrated: `rows` samples (labels cycling over the classes)
    drawn at each guidance strength in `guidance` with `steps` ancestral steps from `seed`."""

    guidance: tuple[float, ...] = (0.3, 1.0, 4.0)
    steps: int = 32
    rows: int = 8
    seed: int = 0

    def __post_init__(self):
        if not self.guidance or self.steps < 1 or self.rows < 1:
            raise ValueError("calibration needs ≥ 1 guidance strength, step and row")


class _Recorder:
    """A Denoiser that runs `model` in fp32 and keeps every (z, λ, labels) it is called with."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.num_classes, self.sample_shape = model.num_classes, tuple(model.sample_shape)
        self.clip = getattr(model, "clip", None)
        self.logsnr_range = getattr(model, "logsnr_range", None)
        self.calls: list[tuple[np.ndarray, ...]] = []

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor):
        self.calls.append((z.float().numpy().copy(), logsnr.float().numpy().copy(),
                           labels.long().numpy().copy()))
        return self.model(z, logsnr, labels)


def calibration_inputs(model: torch.nn.Module, settings: Calibration, sample) -> list[tuple]:
    """The network inputs (z, λ, labels as numpy) of guided sampling runs of `model` on the CPU,
    made by `sample` (`cfgengine.sample`: the engine's own loop, passed in by the layer above)."""
    recorder = _Recorder(model)
    labels = torch.arange(settings.rows) % model.num_classes
    with torch.inference_mode():
        for w in settings.guidance:
            sample(recorder, labels, w=float(w), steps=settings.steps, seed=settings.seed,
                   backend="torch", device="cpu", precision="fp32")
    return recorder.calls


def reduce_range() -> bool:
    """Whether weights use 7 bits: without VNNI, ORT's u8×s8 kernels (VPMADDUBSW) can saturate
    their int16 sums at full range (onnxruntime's quantization guide)."""
    from cfgengine.cpu import has_flag

    return not (has_flag("avx512_vnni") or has_flag("avx_vnni"))


def cache_key(fp32_key: str, settings: Calibration, config=None) -> str:
    """SHA-256 of the int8 graph's inputs: the model's graph key, its config (the graph key hashes
    weights, class and shape, but e.g. a head count changes the graph, not the weights) and
    everything quantizing adds."""
    import onnxruntime

    config = asdict(config) if is_dataclass(config) else repr(config)
    parts = dict(graph=fp32_key, config=config, calibration=asdict(settings),
                 reduce_range=reduce_range(),
                 ops=QUANTIZED_OPS,
                 onnxruntime=onnxruntime.__version__, format=FORMAT, precision="int8")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def quantize(model: torch.nn.Module, fp32_path: Path, path: Path, settings: Calibration,
             sample, props: dict[str, str] | None = None) -> Path:
    """Write the int8 QDQ graph of the fp32 graph at `fp32_path` to `path` (atomically), with
    our metadata (precision int8) and digest, and `props` as further metadata entries (the
    graph cache's key); returns the path."""
    import tempfile

    import onnx
    from onnxruntime import quantization as q

    from cfgengine.atomic import atomic_path
    from cfgengine.export import metadata, onnx as onnx_export

    reader = _Reader(calibration_inputs(model, settings, sample))
    meta = onnx_export.read_metadata(Path(fp32_path))
    with tempfile.TemporaryDirectory(prefix="cfgengine-int8-") as tmp:
        raw = Path(tmp) / "int8.onnx"
        with quiet_logger():  # ORT's quantizer logs a line per norm layer on the root
            q.quantize_static(str(fp32_path), str(raw), reader, quant_format=q.QuantFormat.QDQ,
                              per_channel=True, reduce_range=reduce_range(),
                              activation_type=q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8,
                              calibrate_method=q.CalibrationMethod.MinMax,
                              op_types_to_quantize=list(QUANTIZED_OPS))
        proto = onnx.load_model(str(raw))
    del proto.metadata_props[:]
    int8 = metadata.ExportMeta(**{**asdict(meta), "precision": "int8"})
    proto = onnx_export.with_metadata(proto, int8)
    for name, value in (props or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = name, value
    with atomic_path(Path(path), ".onnx") as tmp_path:
        onnx.save_model(proto, tmp_path)
    return Path(path)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over recorded calls."""

    def __init__(self, calls: list[tuple]):
        self._feeds = iter([dict(zip(INPUTS, call)) for call in calls])

    def get_next(self):
        return next(self._feeds, None)


def export_int8(model: torch.nn.Module, path: str | Path, *, max_batch: int = 64,
                opset: int | None = None, source: str | None = None,
                settings: Calibration = Calibration(), sample=None) -> Path:
    """`cfgengine export --format onnx --precision int8`: the fp32 ONNX export, quantized,
    calibrated by `sample` (`cfgengine.sample`)."""
    import tempfile

    from cfgengine.export import onnx as onnx_export
    from cfgengine.export.metadata import check_class_conditional
    from cfgengine.model import info

    check_class_conditional(info(model).conditioning, "precision int8")
    if sample is None:
        raise ValueError("an int8 export calibrates on the model's own sampling: pass "
                         "sample=cfgengine.sample")
    with tempfile.TemporaryDirectory(prefix="cfgengine-int8-") as tmp:
        fp32 = onnx_export.export(model, Path(tmp) / "fp32.onnx", max_batch=max_batch,
                                  opset=opset or onnx_export.OPSET, source=source)
        return quantize(model, fp32, Path(path), settings, sample)
