"""What every exported artifact records about its model (num_classes, sample shape, clip, λ range,
precision, batch range, source weights hash), stored as one JSON string in the artifact itself:
ONNX `metadata_props`, the AOTInductor package metadata, the TensorRT plan header.

Version 2 artifacts hold the plain denoiser (rows in = rows out, batch up to 2·max_batch); the
loaded backend makes the doubled batch itself and can also run B rows (docs/design.md). Version 1
files held the doubled-batch graph only and are refused with a "re-export" message. A
guidance-distilled model (`guidance_embedded`) is exported with w as a fourth input, one value per
row; files written before that field existed read as False."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from cfgengine.model import info
from cfgengine.precision import PRECISIONS
from cfgengine.provenance import weights_sha256  # noqa: F401 — re-exported: the artifact's source hash
from cfgengine.schedule import LOGSNR_RANGE, check_logsnr_range

FORMAT = "cfgengine-export"
VERSION = 2
KEY = "cfgengine"  # the metadata key under which the JSON is stored in every format
PROGRAM = "denoiser"  # what the graph computes: ε for each row (not the doubled batch)
DIGEST_KEY = "cfgengine-digest"  # ONNX: `digest(json, graph bytes)` beside the JSON
OPTIONAL = {"guidance_embedded"}  # fields added within VERSION 2: absent means the default



@dataclass(frozen=True)
class ExportMeta:
    """The model facts a backend needs (docs/design.md §3) plus provenance of the weights."""

    num_classes: int
    sample_shape: tuple[int, ...]
    clip: float | None
    precision: str
    min_batch: int
    max_batch: int
    source: str
    source_sha256: str
    class_names: tuple[str, ...] = ()
    logsnr_range: tuple[float, float] = LOGSNR_RANGE
    guidance_embedded: bool = False
    program: str = PROGRAM
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def parse(text: str | None, path: str | Path) -> ExportMeta:
    """ExportMeta from its stored JSON; ValueError naming `path` when absent, foreign or stale."""
    if text is None:
        raise ValueError(f"{path}: no cfgengine metadata (not exported by cfgengine export)")
    try:
        stored = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{path}: cfgengine metadata is not valid JSON") from None
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata is not of format {FORMAT}")
    if stored.get("version") != VERSION:
        raise ValueError(f"{path}: export format version {stored.get('version')}, this cfgengine "
                         f"reads version {VERSION}; re-export the model")
    return _from_dict(stored, path)


def _from_dict(stored: dict, path: str | Path) -> ExportMeta:
    names = {f.name for f in fields(ExportMeta)}
    if not set(stored) <= names or not names - OPTIONAL <= set(stored):
        raise ValueError(f"{path}: metadata fields {sorted(set(stored) ^ names)} missing or "
                         "unknown")
    try:
        logsnr_range = check_logsnr_range(stored["logsnr_range"])
    except ValueError as err:
        raise ValueError(f"{path}: metadata {err}") from None
    try:
        stored = dict(stored, sample_shape=tuple(stored["sample_shape"]),
                      class_names=tuple(stored["class_names"]), logsnr_range=logsnr_range)
    except TypeError:
        raise ValueError(f"{path}: metadata sample_shape / class_names are not lists") from None
    meta = ExportMeta(**stored)
    check_values(meta, path)
    return meta


def check_values(meta: ExportMeta, path: str | Path) -> None:
    """ValueError (one line) for metadata values no cfgengine export writes: an edited file."""
    def bad(what: str):
        raise ValueError(f"{path}: metadata {what} (edited?); re-export the model")

    if not _is_int(meta.num_classes) or meta.num_classes < 1:
        bad(f"num_classes {meta.num_classes!r} is not a positive integer")
    if not meta.sample_shape or not all(_is_int(d) and d > 0 for d in meta.sample_shape):
        bad(f"sample_shape {meta.sample_shape!r} is not a list of positive integers")
    if meta.clip is not None and (not isinstance(meta.clip, (int, float))
                                  or isinstance(meta.clip, bool) or not 0 < meta.clip < math.inf):
        bad(f"clip {meta.clip!r} is neither null nor a positive number")
    if not isinstance(meta.guidance_embedded, bool):
        bad(f"guidance_embedded {meta.guidance_embedded!r} is not true or false")
    if meta.program != PROGRAM:
        bad(f"program {meta.program!r}: this cfgengine runs {PROGRAM!r} graphs")
    if meta.precision not in PRECISIONS:
        bad(f"precision {meta.precision!r} is unknown")
    if not (_is_int(meta.min_batch) and _is_int(meta.max_batch)
            and 1 <= meta.min_batch <= meta.max_batch):
        bad(f"batch range [{meta.min_batch!r}, {meta.max_batch!r}] is not 1 ≤ min ≤ max")
    if meta.class_names and (len(meta.class_names) != meta.num_classes
                             or not all(isinstance(n, str) for n in meta.class_names)):
        bad(f"class_names do not name {meta.num_classes} classes")


LABEL_TABLE = "class_embed.weight"  # the label embedding of cfgengine's UNet: num_classes + 1 rows


def check_label_table(rows: int | None, meta: ExportMeta, path: str | Path,
                      graph: str = "graph") -> None:
    """ValueError unless the graph's label table (`rows`, None when it has none) has
    num_classes + 1 rows: edited metadata would make a class id act as the null label."""
    if rows is not None and rows != meta.num_classes + 1:
        raise ValueError(f"{path}: metadata does not fit the {graph}: num_classes "
                         f"{meta.num_classes}, but its label table has {rows} rows "
                         "(num_classes + 1 null label); re-export the model")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def digest(meta_json: str, body: bytes) -> str:
    """SHA-256 binding the metadata JSON to the graph it describes: metadata edited, or copied
    from another export, no longer matches."""
    return hashlib.sha256(meta_json.encode() + b"\0" + body).hexdigest()


def export_dtype(precision: str, allowed: tuple[str, ...], what: str) -> torch.dtype:
    """The dtype of `precision`; ValueError if `what` (a format) cannot hold it."""
    if precision not in allowed:
        raise ValueError(f"{what} cannot export precision {precision!r}; choose one of "
                         f"{', '.join(allowed)}")
    return PRECISIONS[precision]


def check_exportable(model, source: str | None = None) -> None:
    """ValueError unless `model` is a torch nn.Module Denoiser (cfgengine.model)."""
    name = f"{source} ({type(model).__name__})" if source else type(model).__name__
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{name} is not a torch nn.Module denoiser; only torch models "
                         "(e.g. a UNet checkpoint) can be exported")
    if info(model).conditioning != "class":  # info: ValueError naming what a denoiser lacks
        raise ValueError(f"{name} is conditioned on prompts; exports take class labels only "
                         "(sample it with backend torch or compile)")


def describe(model: torch.nn.Module, precision: str, max_batch: int, source: str | None,
             min_batch: int = 1) -> ExportMeta:
    """The metadata of `model` exported at `precision` for batches min_batch..max_batch."""
    facts = info(model)
    return ExportMeta(num_classes=facts.num_classes, sample_shape=facts.sample_shape,
                      clip=facts.clip, precision=precision,
                      min_batch=min_batch, max_batch=max_batch,
                      source=str(source or type(model).__name__),
                      source_sha256=weights_sha256(model), class_names=facts.class_names,
                      logsnr_range=check_logsnr_range(facts.logsnr_range),
                      guidance_embedded=facts.guidance_embedded)
