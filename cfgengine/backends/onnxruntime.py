"""ONNX Runtime as a backend for a torch Denoiser, exported on first use and cached (the CPU
`auto` backend and `backend="onnxruntime"`; docs/design.md, "CPU backend").

The plain denoiser is exported once per cache key (the loaded backend runs the conditional and
null rows as one doubled batch, and B rows where a step is guided) — the digest of everything the
graph is derived from (cfgengine.provenance: the weights' bytes, the model's class, the source of
every module class in it, its stated config and plain attributes, its conditioning path; here also
the sample shape, a prompt model's text inputs and their per-row shapes, precision, batch range,
opset and versions) — to
`$CFGENGINE_CACHE_DIR/onnx/KEY.onnx` (default `~/.cache/cfgengine`, or `$XDG_CACHE_HOME/cfgengine`),
and its ONNX Runtime session is kept in memory per key for the life of the process. The key is
re-derived when a tensor was replaced or changed in place (checked on every call) and when the
tensors' bytes or the settings changed behind torch's version counters (a CRC-32, checked once
per sampling call), so a stale session is never reused. A graph read from the cache must record
this key and these weights, else it is exported again; a cache folder other users can write is
refused (under `auto`: a private temporary folder, with a warning).

Exporting costs seconds (fp32 goes through the TorchScript tracer: about 5 s for the default model
on a loaded 2-core CPU; the dynamo exporter of `cfgengine export` takes 10 s or more), so under
`auto` a call exports only when its work pays for that — `AUTO_EXPORT_ROW_STEPS` rows × steps or
more — or when the session is already cached; smaller calls run eager torch. Under `auto` any export or session failure prints ONE warning line on stderr and
the Sampler keeps running eager torch; under an explicit `onnxruntime` it is a ValueError.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import stat
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from cfgengine import provenance
from cfgengine.export.program import text_inputs
from cfgengine.logs import quiet_logger
from cfgengine.model import TextCondition, info

MAX_BATCH = 4096  # guided rows per call the cached graph accepts (2·MAX_BATCH network rows)
AUTO_EXPORT_ROW_STEPS = 4096  # ≈ 2.5× the break-even of a 10 s export at ~4 ms saved per row-step
AUTO_PRECISIONS = ("fp32",)  # ORT's CPU fp16 convolutions are slower than torch's: auto stays eager
MEMORY_SESSIONS = 8  # sessions kept per process (least recently used dropped)
REQUIRED = ("onnxruntime", "onnx", "onnxscript")  # to export (dynamo exporter) and to run
KEY_PROP = "cfgengine-cache-key"  # ONNX metadata_props entry: the key a cached graph was made for
STALE_TEMP_S = 6 * 3600  # a cache write's temp file older than this was left by a killed process
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


def cache_key(model: torch.nn.Module, precision: str, sample_shape: tuple[int, ...],
              text_inputs: tuple = ()) -> str:
    """SHA-256 over everything the exported graph depends on (`text_inputs`: a prompt model's
    graph inputs and their per-row shapes, export.program.text_inputs)."""
    return provenance.digest(derivation(model, precision, sample_shape, text_inputs))


def derivation(model: torch.nn.Module, precision: str, sample_shape: tuple[int, ...],
               text_inputs: tuple = ()) -> dict:
    """The model's derivation (cfgengine.provenance) and how the graph is made from it."""
    from cfgengine.export import metadata, onnx as onnx_export

    parts = dict(provenance.derivation(model), shape=list(sample_shape), precision=precision,
                 batch=[1, MAX_BATCH], opset=onnx_export.OPSET, versions=_versions(),
                 format=metadata.VERSION)
    return with_text_inputs(parts, text_inputs)


def with_text_inputs(parts: dict, text_inputs: tuple) -> dict:
    """`parts` and, for a prompt model's graph, its text inputs (class keys stay as they were)."""
    return dict(parts, text_inputs=[[name, list(shape)] for name, shape in text_inputs]) \
        if text_inputs else parts


@functools.lru_cache(maxsize=1)
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("cfgengine", "torch", *REQUIRED):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def cache_folder(auto: bool) -> Path:
    """The cache folder when no other user can write it or a folder above it; else ValueError,
    or under `auto` a private temporary folder for this process (one warning line)."""
    folder = cache_dir()
    problem = _unsafe(folder)
    if problem is None:
        return folder
    why = f"{problem}: not used as the ONNX cache (set CFGENGINE_CACHE_DIR to a private folder)"
    if not auto:
        raise ValueError(why)
    _warn_once(f"{why}; using a private temporary folder")
    return private_folder()


def _unsafe(folder: Path) -> str | None:
    """Why another user could plant or swap graphs in `folder`, or None: it or a folder above
    it is world-writable without the sticky bit, or it (or its parent) belongs to another user."""
    folder = folder.resolve()  # a symlinked cache is judged where it points
    for depth, path in enumerate([folder, *folder.parents]):
        try:
            info_ = path.stat()
        except OSError:
            continue  # not created yet: we create it, 0700 … umask
        if info_.st_mode & stat.S_IWOTH and not info_.st_mode & stat.S_ISVTX:
            return f"{path} is writable by every user"
        if depth < 2 and info_.st_uid not in (os.geteuid(), 0):
            return f"{path} belongs to another user (uid {info_.st_uid})"
    return None


@functools.lru_cache(maxsize=1)
def private_folder() -> Path:
    """A 0700 temporary folder kept for this process's graphs."""
    return Path(tempfile.mkdtemp(prefix="cfgengine-onnx-"))


@functools.lru_cache(maxsize=None)
def _warn_once(line: str) -> None:
    print(f"cfgengine: warning: {line}", file=sys.stderr)


def session(model: torch.nn.Module, precision: str, device: torch.device, key: str,
            weights: str | None = None, folder: Path | None = None,
            write: Callable[[Path, str], Path] | None = None):
    """The OnnxBackend of `model` for `key` (`weights`: its weights' SHA-256): from memory, else
    from `folder` (default: the cache folder) when the graph there records this key and these
    weights, else made now by `write(path, key)` (default: exported at `precision`), replacing a
    corrupt, foreign or stale entry. ValueError naming the file to delete when even a fresh
    graph cannot be used."""
    weights = weights or provenance.weights_sha256(model)
    folder = folder or cache_folder(auto=False)
    write = write or functools.partial(_export, model, precision)
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
        return _SESSIONS[key]
    path = folder / f"{key}.onnx"
    backend, why = _load_cached(path, device, key, weights) if path.is_file() else (None, None)
    if backend is None:
        try:
            path = write(path, key)
        except Exception as err:
            if why is None:
                raise
            raise ValueError(f"{path}: cached graph unusable ({why}) and exporting again failed "
                             f"({_first_line(err)}); delete this file") from err
        backend, why = _load_cached(path, device, key, weights)
        if backend is None:
            raise ValueError(f"{path}: the graph just exported is unusable ({why}); delete "
                             "this file")
    _SESSIONS[key] = backend
    while len(_SESSIONS) > MEMORY_SESSIONS:
        _SESSIONS.popitem(last=False)
    return backend


def _load_cached(path: Path, device: torch.device, key: str, weights: str):
    """(backend, None) when the graph at `path` loads and records `key` and `weights`; else
    (None, why): corrupt, foreign (another model's graph under this name) or stale."""
    from cfgengine.export import onnx as onnx_export

    try:
        backend = onnx_export.load(path, device=device)
    except ValueError as err:  # unreadable, digest or shape mismatch, ORT refuses it
        return None, str(err).replace(f"{path}: ", "").strip().splitlines()[0][:200]
    recorded = backend.session.get_modelmeta().custom_metadata_map.get(KEY_PROP)
    if recorded != key or backend.meta.source_sha256 != weights:
        return None, "it records another model's weights or settings"
    return backend, None


def _first_line(err: Exception, limit: int = 200) -> str:
    text = (str(err).strip().splitlines() or [""])[0][:limit]
    return f"{type(err).__name__}: {text}"


def cached(key: str, folder: Path | None = None) -> bool:
    """Whether `key` has a session in memory or a graph on disk (no export needed)."""
    return key in _SESSIONS or ((folder or cache_dir()) / f"{key}.onnx").is_file()


def _export(model: torch.nn.Module, precision: str, path: Path, key: str,
            text_inputs: tuple = ()) -> Path:
    """Write the graph of `model` (recording `key`; a prompt model with `text_inputs` as inputs)
    to `path`: fp32 by the TorchScript tracer (a few seconds), else — or if the tracer fails — by
    `cfgengine export`'s own dynamo path (several times slower)."""
    from cfgengine.export import onnx as onnx_export
    from cfgengine.export.program import trace

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home, full disk: keep the graph for this process only
        path = private_folder() / path.name
    if precision == "fp32":
        try:
            return _save(_traced_proto(model, text_inputs), path, key)
        except Exception:  # noqa: BLE001 — an exporter's failure of any type: try the other one
            pass
    with _quiet_exporter():
        proto = onnx_export.to_proto(trace(model, precision=precision, max_batch=MAX_BATCH,
                                           source=type(model).__name__,
                                           text_inputs=text_inputs))
    return _save(proto, path, key)


def _traced_proto(model: torch.nn.Module, text_inputs: tuple = ()):
    """The plain denoiser (rows in = rows out, as every export format holds it: the loaded
    backend builds the doubled batch and also runs B rows) through torch.onnx's TorchScript
    tracer, symbolic batch, our metadata and digest, after the full ONNX checker."""
    import io

    import onnx

    from cfgengine.export import metadata, onnx as onnx_export
    from cfgengine.export.program import EXAMPLE_BATCH, OUTPUT, example_inputs, graph_module, \
        input_names

    meta = metadata.describe(model, "fp32", MAX_BATCH, type(model).__name__,
                             text_inputs=text_inputs)
    net = graph_module(model, meta, "fp32").cpu().eval()
    buffer, names = io.BytesIO(), input_names(meta)
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(net, example_inputs(meta, EXAMPLE_BATCH, "cpu"), buffer,
                          dynamo=False, opset_version=onnx_export.OPSET, input_names=list(names),
                          output_names=[OUTPUT],
                          dynamic_axes={name: {0: "batch"} for name in (*names, OUTPUT)})
    return onnx_export.with_metadata(onnx.load_model_from_string(buffer.getvalue()), meta)


def _save(proto, path: Path, key: str) -> Path:
    """`proto`, recording the key it was made for, written atomically to `path` (after sweeping
    the temp files killed writes left there)."""
    import onnx

    from cfgengine.atomic import atomic_path

    entry = proto.metadata_props.add()
    entry.key, entry.value = KEY_PROP, key
    sweep_temp_files(path.parent)
    with atomic_path(path, ".onnx") as tmp:
        onnx.save_model(proto, tmp)
    return path


def sweep_temp_files(folder: Path, older_than_s: float = STALE_TEMP_S) -> None:
    """Remove the hidden temp files (`.KEY.onnx.*.onnx`, cfgengine.atomic) that writes killed
    before their rename left in `folder` more than `older_than_s` ago; ours only."""
    cutoff = time.time() - older_than_s
    for tmp in folder.glob(".*.onnx.*.onnx"):
        try:
            info_ = tmp.lstat()
            if stat.S_ISREG(info_.st_mode) and info_.st_uid == os.geteuid() \
                    and info_.st_mtime < cutoff:
                tmp.unlink()
        except OSError:
            pass  # removed by another process meanwhile


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters' deprecation notes and missing-torchvision lines are not the user's business:
    under `auto` the one line that matters is ours."""
    with quiet_logger("torch.onnx"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class OnnxRuntimeDenoiser:
    """`model` (rows in, rows out) on a cached ONNX Runtime session, eager `model` where ONNX
    Runtime does not run: calls below the auto threshold, other sample shapes, batches above
    MAX_BATCH, after a failed export. The sampler gives it the doubled batch of a guided step.
    A prompt model's graph takes the TextCondition's tensors as inputs, shaped as the calls'
    conditions are (`text_inputs`: None until the first call or `warm`; one graph per shape)."""

    def __init__(self, model: torch.nn.Module, precision: str, device: torch.device,
                 auto: bool):
        self.model, self.precision, self.device, self.auto = model, precision, device, auto
        self.info = info(model)
        self.sample_shape = self.info.sample_shape
        self.text_inputs = None if self.info.conditioning == "text" else ()
        self.runtime = "onnxruntime"  # what ran the last call: onnxruntime or torch
        self._fingerprint, self._check, self._parts, self._weights = None, None, None, None
        self._key, self._failed, self._folder, self._modules = None, False, None, None
        self._wanted = not auto

    def plan(self, rows: int, steps: int) -> None:
        """Announce a sampling call of `rows` × `steps` forwards: the model's bytes and settings
        are checked (once per call), and under auto, large enough work (or a session already
        cached) switches this denoiser to ONNX Runtime."""
        key = self.key(check_content=True)
        if self.auto and not self._failed:
            known = self.text_inputs is not None  # a prompt model's graph: after its first call
            self._wanted = rows * steps >= AUTO_EXPORT_ROW_STEPS \
                or known and cached(key, self.folder())

    def warm(self) -> None:
        """Export (or load) the session now, whatever the size of the next call (a prompt
        model's graph for its encoder's text inputs)."""
        from cfgengine.export.program import model_text_inputs

        self._wanted = True
        if self.text_inputs is None:
            self._use_text_inputs(model_text_inputs(self.model))
        self.key(check_content=True)
        self._backend(self.sample_shape, 1)

    def folder(self) -> Path:
        """Where this denoiser's graphs are cached (cache_folder, decided once)."""
        if self._folder is None:
            self._folder = cache_folder(self.auto)
        return self._folder

    def key(self, check_content: bool = False) -> str:
        """The cache key of the model as it is now, re-derived when a tensor was replaced or
        changed in place (every call), or — with `check_content` — when the tensors' bytes, the
        settings or the module tree changed where torch's version counters cannot see
        (`p.data.mul_`, a submodule swapped)."""
        fresh = check_content or self._parts is None
        if fresh:
            self._modules = list(self.model.modules())
        fingerprint = provenance.fingerprint(self._modules)
        check = provenance.content_check(self.model) if fresh else self._check
        if fingerprint != self._fingerprint or check != self._check:
            self._parts = derivation(self.model, self.precision, self.sample_shape)
            self._key, self._weights = None, self._parts["weights"]
            self._fingerprint = fingerprint
            self._check = check if fresh else provenance.content_check(self.model)
        if self._key is None:
            self._key = provenance.digest(with_text_inputs(self._parts, self.text_inputs or ()))
        return self._key

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor, cond, *w: torch.Tensor):
        """ε [N, *S] of N rows as they are (a guided step passes its 2B rows; `cond`: class ids
        or a TextCondition), from one run; a guidance-distilled model also takes w [N] and
        answers ε̃_w (its graph has w as an input)."""
        if isinstance(cond, TextCondition):
            self._use_text_inputs(text_inputs(cond))
        backend = self._backend(tuple(z.shape[1:]), z.shape[0])
        self.runtime = "torch" if backend is None else "onnxruntime"
        run = self.model if backend is None else backend
        return run(z, logsnr, cond, *w)

    def _use_text_inputs(self, shapes: tuple) -> None:
        """The graph takes these text inputs from now on (another key where they change)."""
        if shapes != self.text_inputs:
            self.text_inputs, self._key = shapes, None

    def _backend(self, shape: tuple[int, ...], batch: int):
        if not self._wanted or self._failed or shape != self.sample_shape \
                or batch > 2 * MAX_BATCH:
            return None
        try:
            return self._session()
        except Exception as err:  # the exporters raise many types; all mean "cannot run ORT"
            return self._fall_back(err)

    def _session(self):
        key = self.key()
        return session(self.model, self.precision, self.device, key, self._weights,
                       self.folder(), self._write)

    def _write(self, path: Path, key: str) -> Path:
        """Make this denoiser's graph at `path`, recording `key` (where it lands: see _export)."""
        return _export(self.model, self.precision, path, key, self.text_inputs)

    def _fall_back(self, err: Exception) -> None:
        why = f"ONNX Runtime backend unavailable ({_first_line(err, 500)})"
        if not self.auto:
            raise ValueError(why) from err
        self._failed = True
        print(f"cfgengine: warning: {why}; sampling with eager torch", file=sys.stderr)
        return None
