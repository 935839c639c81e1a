"""ONNX Runtime as a backend for a torch Denoiser, exported on first use and cached (the CPU
`auto` backend and `backend="onnxruntime"`; docs/design.md, "CPU backend").

The plain denoiser is exported once per cache key (the loaded backend runs the conditional and
null rows as one doubled batch, and B rows where a step is unguided)
— the weights' SHA-256 (export/metadata.weights_sha256), the model class and its source file, the
sample shape, precision, batch range, opset and torch/cfgengine versions — to
`$CFGENGINE_CACHE_DIR/onnx/KEY.onnx` (default `~/.cache/cfgengine`, or `$XDG_CACHE_HOME/cfgengine`),
and its ONNX Runtime session is kept in memory per key for the life of the process. A weight file
that changed, an in-place update of the weights (load_state_dict, an optimizer step) or another
shape gives another key, so a stale session is never reused.

Exporting costs seconds (fp32 goes through the TorchScript tracer: about 5 s for the default model
on a loaded 2-core CPU; the dynamo exporter of `cfgengine export` takes 10 s or more), so under
`auto` a call exports only when its work pays for that — `AUTO_EXPORT_ROW_STEPS` rows × steps or
more — or when the session is already cached; smaller calls run eager torch. Under `auto` any export or session failure prints ONE warning line on stderr and
the Sampler keeps running eager torch; under an explicit `onnxruntime` it is a ValueError.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import os
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from cfgengine.model import info

MAX_BATCH = 4096  # guided rows per call the cached graph accepts (2·MAX_BATCH network rows)
AUTO_EXPORT_ROW_STEPS = 4096  # ≈ 2.5× the break-even of a 10 s export at ~4 ms saved per row-step
AUTO_PRECISIONS = ("fp32",)  # ORT's CPU fp16 convolutions are slower than torch's: auto stays eager
MEMORY_SESSIONS = 8  # sessions kept per process (least recently used dropped)
REQUIRED = ("onnxruntime", "onnx", "onnxscript")  # to export (dynamo exporter) and to run
_SESSIONS: OrderedDict[str, object] = OrderedDict()


def available() -> bool:
    """Whether onnxruntime and the exporter's dependencies import here."""
    try:
        for module in REQUIRED:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def cache_dir() -> Path:
    """Where exported graphs are kept across processes."""
    root = os.environ.get("CFGENGINE_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "cfgengine"
    return Path(root) / "onnx"


def cache_key(model: torch.nn.Module, precision: str, sample_shape: tuple[int, ...]) -> str:
    """SHA-256 over everything the exported graph depends on."""
    from cfgengine.export import metadata, onnx as onnx_export

    cls = type(model)
    source = inspect.getsourcefile(cls)
    parts = dict(weights=metadata.weights_sha256(model), cls=f"{cls.__module__}.{cls.__qualname__}",
                 code=_file_sha256(source), shape=list(sample_shape), precision=precision,
                 batch=[1, MAX_BATCH], opset=onnx_export.OPSET, torch=torch.__version__,
                 format=metadata.VERSION)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: str | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def session(model: torch.nn.Module, precision: str, device: torch.device, key: str):
    """The OnnxBackend of `model` for `key`: from memory, else from the disk cache, else exported
    now (into the cache; a temporary folder when the cache folder is not writable)."""
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
        return _SESSIONS[key]
    from cfgengine.export import onnx as onnx_export

    path = cache_dir() / f"{key}.onnx"
    if not path.is_file():
        path = _export(model, precision, path)
    backend = onnx_export.load(path, device=device)
    _SESSIONS[key] = backend
    while len(_SESSIONS) > MEMORY_SESSIONS:
        _SESSIONS.popitem(last=False)
    return backend


def cached(key: str) -> bool:
    """Whether `key` has a session in memory or a graph on disk (no export needed)."""
    return key in _SESSIONS or (cache_dir() / f"{key}.onnx").is_file()


def _export(model: torch.nn.Module, precision: str, path: Path) -> Path:
    """Write the graph of `model` to `path`: fp32 by the TorchScript tracer (a few seconds), else
    — or if the tracer fails — by `cfgengine export`'s own dynamo path (several times slower)."""
    from cfgengine.export import onnx as onnx_export

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home, full disk: keep the graph for this process only
        path = Path(tempfile.mkdtemp(prefix="cfgengine-onnx-")) / path.name
    if precision == "fp32":
        try:
            return _export_traced(model, path)
        except Exception:  # noqa: BLE001 — an exporter's failure of any type: try the other one
            pass
    with _quiet_exporter():
        return onnx_export.export(model, path, precision=precision, max_batch=MAX_BATCH,
                                  source=type(model).__name__)


def _export_traced(model: torch.nn.Module, path: Path) -> Path:
    """The plain denoiser (rows in = rows out, as every export format holds it: the loaded
    backend builds the doubled batch and also runs B rows) through torch.onnx's TorchScript
    tracer, symbolic batch, our metadata and digest, the full ONNX checker, written atomically."""
    import io

    import onnx

    from cfgengine.atomic import atomic_path
    from cfgengine.export import metadata, onnx as onnx_export
    from cfgengine.export.program import EXAMPLE_BATCH, OUTPUT, cast_for_export, \
        example_inputs, input_names

    meta = metadata.describe(model, "fp32", MAX_BATCH, type(model).__name__)
    net = cast_for_export(model, "fp32").cpu().eval()
    buffer, names = io.BytesIO(), input_names(meta)
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(net, example_inputs(meta, EXAMPLE_BATCH, "cpu"), buffer,
                          dynamo=False, opset_version=onnx_export.OPSET, input_names=list(names),
                          output_names=[OUTPUT],
                          dynamic_axes={name: {0: "batch"} for name in (*names, OUTPUT)})
    proto = onnx_export.with_metadata(onnx.load_model_from_string(buffer.getvalue()), meta)
    with atomic_path(path, ".onnx") as tmp:
        onnx.save_model(proto, tmp)
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters' deprecation notes and missing-torchvision lines are not the user's business:
    under `auto` the one line that matters is ours."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class OnnxRuntimeDenoiser:
    """`model` (rows in, rows out) on a cached ONNX Runtime session, eager `model` where ONNX
    Runtime does not run: calls below the auto threshold, other sample shapes, batches above
    MAX_BATCH, after a failed export. The sampler gives it the doubled batch of a guided step."""

    def __init__(self, model: torch.nn.Module, precision: str, device: torch.device,
                 auto: bool):
        self.model, self.precision, self.device, self.auto = model, precision, device, auto
        self.info = info(model)
        self.sample_shape = self.info.sample_shape
        self.runtime = "onnxruntime"  # what ran the last call: onnxruntime or torch
        self._tensors = list(model.state_dict().values())
        self._fingerprint, self._key, self._failed = None, None, False
        self._wanted = not auto

    def plan(self, rows: int, steps: int) -> None:
        """Announce a sampling call of `rows` × `steps` forwards: under auto, large enough work
        (or a session already cached) switches this denoiser to ONNX Runtime."""
        if self.auto and not self._failed:
            self._wanted = rows * steps >= AUTO_EXPORT_ROW_STEPS or cached(self.key())

    def warm(self) -> None:
        """Export (or load) the session now, whatever the size of the next call."""
        self._wanted = True
        self._backend(self.sample_shape, 1)

    def key(self) -> str:
        """The cache key of the weights as they are now (rehashed only after an in-place change)."""
        fingerprint = [(t.data_ptr(), t._version) for t in self._tensors]
        if fingerprint != self._fingerprint:
            self._key = cache_key(self.model, self.precision, self.sample_shape)
            self._fingerprint = fingerprint
        return self._key

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor):
        """ε [N, *S] of N rows as they are (a guided step passes its 2B rows), from one run."""
        backend = self._backend(tuple(z.shape[1:]), z.shape[0])
        self.runtime = "torch" if backend is None else "onnxruntime"
        return self.model(z, logsnr, labels) if backend is None else backend(z, logsnr, labels)

    def _backend(self, shape: tuple[int, ...], batch: int):
        if not self._wanted or self._failed or shape != self.sample_shape \
                or batch > 2 * MAX_BATCH:
            return None
        try:
            return session(self.model, self.precision, self.device, self.key())
        except Exception as err:  # the exporters raise many types; all mean "cannot run ORT"
            return self._fall_back(err)

    def _fall_back(self, err: Exception) -> None:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        why = f"ONNX Runtime backend unavailable ({type(err).__name__}: {first})"
        if not self.auto:
            raise ValueError(why) from err
        self._failed = True
        print(f"cfgengine: warning: {why}; sampling with eager torch", file=sys.stderr)
        return None
