"""Hugging Face hub ids (`org/name`) as people type them: `cfgengine.load("org/name")` and
`--ckpt org/name` resolve through huggingface_hub — its local cache when offline (HF_HUB_OFFLINE),
a download of the pipeline folder when online — or fail in one line naming what is missing."""
from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# weights in formats cfgengine never reads (diffusers reads safetensors, else .bin)
SKIPPED = ["*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.ot", "*.gguf"]
TRUE = ("1", "true", "yes", "on")


def is_hub_id(name: str) -> bool:
    """`org/name` with nothing else: no suffix a model file has, no leading ./ or /."""
    return HUB_ID.fullmatch(name) is not None and Path(name).suffix not in (
        ".pt", ".safetensors", ".onnx", ".pt2", ".plan", ".engine")


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


def snapshot(repo_id: str) -> Path:
    """The local folder of hub model `repo_id`: the cached snapshot (offline), else downloaded
    into the cache (HF_HUB_CACHE or huggingface_hub's default); ValueError in one line when it is
    not there or cannot be fetched."""
    from cfgengine.export.artifact import require  # the optional-dependency import, one place

    hf = require("huggingface_hub", "diffusers")
    errors = require("huggingface_hub.errors", "diffusers")
    constants = require("huggingface_hub.constants", "diffusers")
    cache = os.environ.get("HF_HUB_CACHE") or None  # read now: tests and users set it late
    local = offline()
    try:
        return Path(hf.snapshot_download(repo_id, cache_dir=cache, local_files_only=local,
                                         ignore_patterns=SKIPPED))
    except errors.LocalEntryNotFoundError:
        where = cache or constants.HF_HUB_CACHE
        how = "HF_HUB_OFFLINE is set" if local else "and the hub could not be reached"
        raise ValueError(f"{repo_id}: not a local path, and not in the Hugging Face cache "
                         f"({where}); {how} — download it once online") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as err:
        raise ValueError(f"{repo_id}: not a local path, and the hub refuses it "
                         f"({type(err).__name__}; log in with `hf auth login` if it is gated "
                         "or private)") from None
    except (errors.HfHubHTTPError, OSError) as err:
        raise ValueError(f"{repo_id}: not a local path, and downloading it failed: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") \
            from None
