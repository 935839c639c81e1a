"""TensorRT engines (EXPERIMENTAL: written against the documented TensorRT 10 Python API, not run
in CI, which has no GPU) built from the ONNX export, and a runtime backend on the torch stream.

- Build: a strongly typed network (precisions come from the ONNX graph, so fp16 = the fp16 ONNX
  with its fp32 normalisations), one optimisation profile min/opt/max over the batch, a timing
  cache.
- Engine cache: `<cache>/<key>.plan`, key = SHA-256 of (ONNX bytes, TensorRT version, GPU compute
  capability, profile, precision); an entry whose stored key differs or is unreadable is rebuilt.
- A `.plan` written by cfgengine is MAGIC, an 8-byte little-endian header length, a JSON header
  (metadata, key, TensorRT version, compute capability, profile) and the serialized engine.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from cfgengine.export import metadata
from cfgengine.export.artifact import Backend, require
from cfgengine.export.onnx import to_proto
from cfgengine.export.program import (INPUTS, OUTPUT, Traced, check_batch_range, input_names,
                                      trace)
from cfgengine import trust
from cfgengine.atomic import atomic_path
from cfgengine.model import info

SUPPORTED_PRECISIONS = ("fp32", "fp16")  # bf16 would need a bf16 ONNX graph, which we do not export
MAGIC = b"CFGENGINE-TRT\n"
_LENGTH = struct.Struct("<Q")
WORKSPACE_BYTES = 4 << 30


@dataclass(frozen=True)
class Profile:
    """An optimisation profile over the guided batch B: min ≤ opt ≤ max. The engine's rows run
    from min (the B-row entry) to 2·max (the doubled batch), optimised for 2·opt."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        check_batch_range(self.min, self.max)
        if isinstance(self.opt, bool) or not isinstance(self.opt, int) \
                or not self.min <= self.opt <= self.max:
            raise ValueError(f"profile opt batch must be in [{self.min}, {self.max}], "
                             f"got {self.opt!r}")

    def shapes(self, sample_shape: tuple[int, ...], names=INPUTS
               ) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape of each engine input `names`, in rows."""
        rows = (self.min, 2 * self.opt, 2 * self.max)
        return {name: tuple((b, *sample_shape) if name == "z" else (b,) for b in rows)
                for name in names}


@dataclass(frozen=True)
class Target:
    """What a serialized engine is valid for: the TensorRT version and the GPU architecture."""

    tensorrt: str
    compute_capability: str


def cache_key(onnx_bytes: bytes, target: Target, profile: Profile, precision: str) -> str:
    """SHA-256 naming an engine: any change of graph, TensorRT, GPU, profile or precision."""
    parts = {"onnx": hashlib.sha256(onnx_bytes).hexdigest(), "tensorrt": target.tensorrt,
             "compute_capability": target.compute_capability, "precision": precision,
             "profile": [profile.min, profile.opt, profile.max]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    """$CFGENGINE_CACHE/tensorrt, else ~/.cache/cfgengine/tensorrt."""
    root = os.environ.get("CFGENGINE_CACHE") or Path.home() / ".cache" / "cfgengine"
    return Path(root) / "tensorrt"


def write_plan(path: str | Path, header: dict, engine: bytes) -> Path:
    """Write MAGIC + header length + JSON header + engine bytes, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(header, sort_keys=True).encode()
    with atomic_path(path, ".plan") as tmp:
        Path(tmp).write_bytes(MAGIC + _LENGTH.pack(len(text)) + text + engine)
    return path


def read_plan(path: str | Path) -> tuple[dict, bytes]:
    """(header, engine bytes) of a cfgengine plan; ValueError naming the path otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    return parse_plan(path.read_bytes(), path)


def parse_plan(data: bytes, path: str | Path) -> tuple[dict, bytes]:
    """(header, engine bytes) of a plan's bytes; ValueError naming `path` otherwise."""
    start = len(MAGIC) + _LENGTH.size
    if not data.startswith(MAGIC) or len(data) < start:
        raise ValueError(f"{path}: not a cfgengine TensorRT plan (export it with "
                         "cfgengine export --format tensorrt)")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    try:
        header = json.loads(data[start:start + length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: damaged TensorRT plan header (truncated?)") from None
    if not isinstance(header, dict) or len(data) <= start + length:
        raise ValueError(f"{path}: TensorRT plan without an engine (truncated?)")
    return header, data[start + length:]


def check_target(header: dict, target: Target, path: str | Path) -> None:
    """ValueError if the engine was built for another TensorRT version or GPU architecture
    (TensorRT engines are not portable across either)."""
    built = Target(str(header.get("tensorrt")), str(header.get("compute_capability")))
    if built != target:
        raise ValueError(f"{path}: stale engine, built with TensorRT {built.tensorrt} for compute "
                         f"capability {built.compute_capability}; this is TensorRT "
                         f"{target.tensorrt} on {target.compute_capability}: re-export it")


def cached_engine(directory: Path, header: dict, build: Callable[[], bytes]) -> bytes:
    """The engine stored under header["key"] in `directory`, else `build()`, then stored."""
    entry = Path(directory) / f"{header['key']}.plan"
    if entry.is_file():
        try:
            stored, engine = read_plan(entry)
            if stored.get("key") == header["key"]:
                return engine
        except ValueError:
            pass  # a damaged entry is rebuilt below, overwriting it
    engine = build()
    write_plan(entry, header, engine)
    return engine


def _tensorrt():
    return require("tensorrt", "tensorrt")


def _cuda(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"TensorRT needs a CUDA GPU; device {device} is not available as one")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def current_target(trt, device: torch.device) -> Target:
    """The Target of this process: installed TensorRT and the device's compute capability."""
    major, minor = torch.cuda.get_device_capability(device)
    return Target(str(trt.__version__), f"{major}.{minor}")


def export(model: torch.nn.Module, path: str | Path, *, precision: str = "fp32",
           max_batch: int = 64, opt_batch: int | None = None,
           device: torch.device | str = "cuda", source: str | None = None,
           cache: Path | None = None) -> Path:
    """Build (or take from the cache) a TensorRT engine of `model`; write a plan."""
    metadata.check_class_conditional(info(model).conditioning, "TensorRT")
    metadata.export_dtype(precision, SUPPORTED_PRECISIONS, "TensorRT")
    profile = Profile(1, max_batch if opt_batch is None else opt_batch, max_batch)
    _tensorrt(), _cuda(device)  # fail before the slow trace when neither can work
    traced = trace(model, precision=precision, max_batch=max_batch, source=source)
    return export_program(traced, path, profile=profile, device=device, cache=cache)


def export_program(traced: Traced, path: str | Path, *, profile: Profile,
                   device: torch.device | str = "cuda", cache: Path | None = None) -> Path:
    """Engine plan at `path` from an already traced program, through the engine cache."""
    metadata.check_class_conditional(traced.meta.conditioning, "TensorRT")
    trt, device = _tensorrt(), _cuda(device)
    metadata.export_dtype(traced.meta.precision, SUPPORTED_PRECISIONS, "TensorRT")
    onnx_bytes = to_proto(traced).SerializeToString()
    target = current_target(trt, device)
    meta = replace(traced.meta, min_batch=profile.min, max_batch=profile.max)
    header = {"key": cache_key(onnx_bytes, target, profile, meta.precision),
              "meta": meta.to_json(), "tensorrt": target.tensorrt,
              "compute_capability": target.compute_capability,
              "profile": [profile.min, profile.opt, profile.max]}
    directory = cache or cache_dir()
    with torch.cuda.device(device):
        engine = cached_engine(directory, header, lambda: build_engine(
            trt, onnx_bytes, profile, meta.sample_shape, directory / f"timing-{target.tensorrt}"
            f"-sm{target.compute_capability}.cache"))
    return write_plan(path, header, engine)


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _network(trt, builder, onnx_bytes: bytes, logger):
    """A strongly typed network parsed from ONNX (TensorRT 11 makes strong typing the only mode
    and deprecates the flag, hence the getattr)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse the ONNX graph: {errors}")
    return network, parser


def build_engine(trt, onnx_bytes: bytes, profile: Profile, sample_shape: tuple[int, ...],
                 timing_path: Path) -> bytes:
    """Serialized engine for one batch profile, reusing and updating the timing cache file."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _network(trt, builder, onnx_bytes, logger)  # parser owns the weights
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    shapes = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]  # w when distilled
    for name, (low, opt, high) in profile.shapes(sample_shape, names).items():
        shapes.set_shape(name, low, opt, high)
    config.add_optimization_profile(shapes)
    known = timing_path.read_bytes() if timing_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(known), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    with atomic_path(timing_path, ".cache") as tmp:
        Path(tmp).write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def load(path: str | Path, *, device: torch.device | str = "cuda",
         trust_code: bool = False) -> "TensorRTBackend":
    """The backend of a cfgengine plan; ValueError if foreign, stale, or no GPU/TensorRT. A plan
    is code: it loads only when trusted, checked on the bytes read once here (cfgengine.trust);
    its header is data, read first so that a foreign file says what it is."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    data = Path(path).read_bytes()  # read once: the bytes checked are the bytes deserialized
    header, engine_bytes = parse_plan(data, path)
    meta = metadata.parse(header.get("meta"), path)  # before TensorRT: a foreign file says so
    trust.check_bytes(data, path, "a TensorRT plan", trust_code)
    trt, device = _tensorrt(), _cuda(device)
    check_target(header, current_target(trt, device), path)
    with torch.cuda.device(device):
        engine = trt.Runtime(_logger(trt)).deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise ValueError(f"{path}: TensorRT could not deserialize the engine")
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    expected = [*input_names(meta), OUTPUT]
    if names != set(expected):
        raise ValueError(f"{path}: engine tensors {sorted(names)} are not {expected}")
    return TensorRTBackend(meta, Path(path), device, engine)


class TensorRTBackend(Backend):
    """The backend contract on a TensorRT engine, enqueued on torch's current stream."""

    backend_name = "tensorrt"

    def __init__(self, meta: metadata.ExportMeta, path: Path, device: torch.device, engine):
        super().__init__(meta, path, device)
        self.engine = engine
        self.context = engine.create_execution_context()

    def run(self, z: torch.Tensor, logsnr: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        eps = torch.empty((z.shape[0], *self.sample_shape), device=self.device)  # (rows, *S)
        for name, t in zip(input_names(self.meta), (z, logsnr, *inputs)):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        self.context.set_tensor_address(OUTPUT, eps.data_ptr())
        # torch's caching allocator keeps z/eps alive in stream order: no host sync needed here
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.path}: TensorRT execute_async_v3 failed")
        return eps
