"""What every exported artifact records about its model (num_classes, sample shape, clip, λ range,
precision, batch range, source weights hash), stored as one JSON string in the artifact itself:
ONNX `metadata_props`, the AOTInductor package metadata, the TensorRT plan header.

Version 2 artifacts hold the plain denoiser (rows in = rows out, batch up to 2·max_batch); the
loaded backend makes the doubled batch itself and can also run B rows (docs/design.md). Version 1
files held the doubled-batch graph only and are refused with a "re-export" message. A
guidance-distilled model (`guidance_embedded`) is exported with w as a fourth input, one value per
row; files written before that field existed read as False. A prompt model (`conditioning`
"text", num_classes 0) records its graph's text inputs and their per-row shapes (`text_inputs`:
{"encoder_hidden_states": [L, D], and "pooled": [P] / "mask": [L] where it takes them); class
models write neither field, so their files read as before."""
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
OPTIONAL = {"guidance_embedded", "conditioning", "text_inputs"}  # added within VERSION 2:
# absent means the default; the text fields are written for prompt models only
TEXT_FIELDS = ("conditioning", "text_inputs")
TEXT_RANKS = {"encoder_hidden_states": 2, "pooled": 1, "mask": 1}  # per-row dims of each input


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
    conditioning: str = "class"  # "class": labels in; "text": text_inputs in
    text_inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (graph input, per-row shape)
    program: str = PROGRAM
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        stored = asdict(self)
        if self.conditioning == "class":  # files of class models read by older readers too
            for name in TEXT_FIELDS:
                stored.pop(name)
        else:
            stored["text_inputs"] = dict(stored["text_inputs"])
        return json.dumps(stored, sort_keys=True)


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
    if "text_inputs" in stored:
        stored["text_inputs"] = _text_inputs(stored["text_inputs"], path)
    meta = ExportMeta(**stored)
    check_values(meta, path)
    return meta


def _text_inputs(stored, path: str | Path) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The stored {input: per-row shape} as ExportMeta holds it, in graph-input order."""
    if not isinstance(stored, dict) or not set(stored) <= set(TEXT_RANKS) \
            or not all(isinstance(s, list) for s in stored.values()):
        raise ValueError(f"{path}: metadata text_inputs is not a map of "
                         f"{', '.join(TEXT_RANKS)} to shapes (edited?); re-export the model")
    return tuple((name, tuple(stored[name])) for name in TEXT_RANKS if name in stored)


def check_text_inputs(meta: ExportMeta, bad) -> None:
    """`bad(what)` unless the text fields fit the conditioning: none for a class model; for a
    prompt model num_classes 0, encoder_hidden_states [L, D] and pooled [P] / mask [L]."""
    if meta.conditioning not in ("class", "text"):
        bad(f"conditioning {meta.conditioning!r} is neither class nor text")
    if meta.conditioning == "class":
        if meta.text_inputs:
            bad("text_inputs on a class-conditional model")
        return
    shapes = dict(meta.text_inputs)
    if meta.num_classes != 0 or "encoder_hidden_states" not in shapes:
        bad("of a prompt model needs num_classes 0 and encoder_hidden_states")
    for name, shape in shapes.items():
        if len(shape) != TEXT_RANKS[name] or not all(_is_int(d) and d > 0 for d in shape):
            bad(f"text input {name} has shape {list(shape)!r}, not {TEXT_RANKS[name]} sizes")
    if "mask" in shapes and shapes["mask"][0] != shapes["encoder_hidden_states"][0]:
        bad("text input mask does not have one entry per token")


def check_values(meta: ExportMeta, path: str | Path) -> None:
    """ValueError (one line) for metadata values no cfgengine export writes: an edited file."""
    def bad(what: str):
        raise ValueError(f"{path}: metadata {what} (edited?); re-export the model")

    check_text_inputs(meta, bad)
    if meta.conditioning == "class" and (not _is_int(meta.num_classes) or meta.num_classes < 1):
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
    info(model)  # ValueError naming what a denoiser lacks


def check_class_conditional(conditioning: str, what: str) -> None:
    """ValueError (one line) where `what` (a format, a precision) takes class labels only."""
    if conditioning != "class":
        raise ValueError(f"{what} does not take prompt-conditioned models yet; export to onnx "
                         "or aoti at fp32, fp16 or bf16")


def describe(model: torch.nn.Module, precision: str, max_batch: int, source: str | None,
             min_batch: int = 1, text_inputs: tuple = ()) -> ExportMeta:
    """The metadata of `model` exported at `precision` for batches min_batch..max_batch (a
    prompt model's `text_inputs`: program.model_text_inputs)."""
    facts = info(model)
    text = facts.conditioning == "text"  # a prompt model has no class ids
    return ExportMeta(num_classes=0 if text else facts.num_classes, sample_shape=facts.sample_shape,
                      clip=facts.clip, precision=precision,
                      min_batch=min_batch, max_batch=max_batch,
                      source=str(source or type(model).__name__),
                      source_sha256=weights_sha256(model), class_names=facts.class_names,
                      logsnr_range=check_logsnr_range(facts.logsnr_range),
                      guidance_embedded=facts.guidance_embedded,
                      conditioning=facts.conditioning, text_inputs=tuple(text_inputs))
