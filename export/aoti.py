"""AOTInductor export: the traced denoiser compiled ahead of time into a `.pt2` package
(`torch._inductor.aoti_compile_and_package`), loaded with `torch._inductor.aoti_load_package`.

Our metadata JSON rides in the package's own metadata (`aot_inductor.metadata`), which the loader
returns from `get_metadata()`, so the `.pt2` is one self-describing file. A package runs only on
the device type it was compiled for.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from cfgengine.export import metadata
from cfgengine.export.artifact import Backend
from cfgengine.export.program import Traced, example_condition, trace
from cfgengine import trust
from cfgengine.atomic import atomic_path

SUPPORTED_PRECISIONS = ("fp32", "fp16", "bf16")
_DEVICE_KEY = "AOTI_DEVICE_KEY"  # written by AOTInductor itself: "cpu" or "cuda"
_MODEL_DIR = "/data/aotinductor/model/"  # where a package keeps its compiled library


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
    trust.trusted_hashes()  # a damaged or shared trust file fails now, not after compiling
    configs = {"aot_inductor.metadata": {metadata.KEY: traced.meta.to_json()}}
    with atomic_path(path, ".pt2") as tmp:
        torch._inductor.aoti_compile_and_package(traced.program, package_path=tmp,
                                                 inductor_configs=configs)
    trust.record(path)  # written here by cfgengine export: this user may load it again
    return path


def load(path: str | Path, *, device: torch.device | str | None = None,
         trust_code: bool = False) -> "AotiBackend":
    """The backend of a cfgengine `.pt2`; `device` defaults to (and must match) the package's.
    A package is native code: it loads only when trusted (`cfgengine.trust`), and what is loaded
    is a private copy of the very bytes that were checked. Its label table must have the rows
    the metadata promises."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    with trust.trusted_copy(path, "an AOTInductor package (.pt2)", trust_code) as copy:
        compiled, stored = _load_package(copy, path)
        meta = metadata.parse(stored.get(metadata.KEY), path)
        built_for = stored.get(_DEVICE_KEY, "cpu")
        metadata.check_label_table(_label_table_rows(copy, built_for), meta, path,
                                   "compiled package")
    backend = AotiBackend(meta, path, _device(built_for, device, path), compiled)
    probe(backend)
    return backend


def _load_package(copy: Path, path: Path):
    """(compiled model, its stored metadata) of the package at `copy`; errors name `path`."""
    try:
        compiled = torch._inductor.aoti_load_package(str(copy))
        return compiled, compiled.get_metadata()
    except Exception as err:  # zipfile, RuntimeError from the loader: all mean "not a package"
        raise ValueError(f"{path}: not a loadable AOTInductor package "
                         f"({type(err).__name__})") from err


def _label_table_rows(copy: Path, built_for: str) -> int | None:
    """Rows of the compiled label table, read from the package library's own constants (as the
    ONNX loader reads its initializer); None for a graph without one, and for CUDA packages,
    which Python cannot open a second runner on (cfgengine-run checks those)."""
    runner_type = getattr(torch._C._aoti, "AOTIModelContainerRunnerCpu", None)
    if built_for != "cpu" or runner_type is None:
        return None
    with zipfile.ZipFile(copy) as package:
        libraries = [n for n in package.namelist() if n.endswith(".so") and _MODEL_DIR in n]
        if len(libraries) != 1:
            return None
        library = copy.with_name("model.so")  # beside the private copy, never a shared folder
        library.write_bytes(package.read(libraries[0]))
    constants = runner_type(str(library), 1).extract_constants_map(False)
    rows = [t.shape[0] for name, t in constants.items() if name.endswith(metadata.LABEL_TABLE)]
    return rows[0] if rows else None


def probe(backend: "AotiBackend") -> None:
    """One call at the smallest batch with the largest class id (a prompt model: its recorded
    text inputs) and the recorded sample shape: metadata that does not fit the compiled graph
    (num_classes, sample_shape, text_inputs) fails here in one line instead of mid-sampling in
    C++."""
    meta = backend.meta
    batch = meta.min_batch
    z = torch.zeros((batch, *meta.sample_shape), device=backend.device)
    if meta.conditioning == "text":
        cond, facts = example_condition(meta, batch).to(backend.device), "text inputs " \
            + ", ".join(f"{name} {list(shape)}" for name, shape in meta.text_inputs)
    else:
        cond = torch.full((batch,), meta.num_classes - 1, device=backend.device)
        facts = f"num_classes {meta.num_classes}"
    w = (torch.zeros(batch, device=backend.device),) if meta.guidance_embedded else ()
    try:
        backend(z, torch.zeros(batch, device=backend.device), cond, *w)
    except ValueError as err:
        raise ValueError(f"{backend.path}: metadata does not fit the compiled package "
                         f"({facts}, sample shape {meta.sample_shape}): "
                         f"{str(err).split(': ', 1)[-1]}") from err


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

    def run(self, z: torch.Tensor, logsnr: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self.compiled(z, logsnr, *inputs)  # (rows, *S)
