"""The config fields of a diffusers pipeline folder that cfgengine's adapter reads or diffusers
builds from, checked before anything is built (cfgengine/adapters.py): types and ranges, so an
edited or hostile config ends in one line naming the file and the field — never an allocation of
40000² channels or 3·10⁸ timesteps, nor a traceback from inside diffusers.

The bounds are generous for the UNet2DModel / DiT / SD3 / AutoencoderKL families cfgengine drives
(their published configs stay inside them); null means diffusers' default.
"""
from __future__ import annotations

import math
from pathlib import Path

MAX_CHANNELS = 4096  # widest published UNet2D / DiT / VAE layers: 1280–1152–512
MAX_SIZE = 4096  # sample_size: pixels or latents per side
MAX_CLASSES = 100_000  # class embeddings (ImageNet-21k has 21843)
MAX_TIMESTEPS = 100_000  # num_train_timesteps (DDPM-family models train on 1000)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _integer(value, low: int, high: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return f"must be an integer in [{low}, {high}]"
    return None


def _integers(value, low: int, high: int) -> str | None:
    if not isinstance(value, list) or not value or any(_integer(v, low, high) for v in value):
        return f"must be a non-empty list of integers in [{low}, {high}]"
    return None


def _size(value, low: int, high: int) -> str | None:
    if isinstance(value, list) and len(value) == 2:
        return _integers(value, low, high) and f"must be an integer or [height, width] in " \
            f"[{low}, {high}]"
    return _integer(value, low, high)


def _number(value, low: float, high: float) -> str | None:
    """A finite number strictly between low and high."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not low < value < high:
        return f"must be a number in ({low:g}, {high:g})"
    return None


def _flag(value, *_) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _choice(value, *choices) -> str | None:
    return None if value in choices else f"must be one of {', '.join(choices)}"


def _betas(value, *_) -> str | None:
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_TIMESTEPS \
            or any(_number(v, 0.0, 1.0) for v in value):
        return f"must be a list of 2 to {MAX_TIMESTEPS} numbers in (0, 1)"
    return None


RULES = {  # field → (check, its arguments); any component's config.json or scheduler_config.json
    "in_channels": (_integer, 1, MAX_CHANNELS),
    "out_channels": (_integer, 1, MAX_CHANNELS),
    "latent_channels": (_integer, 1, MAX_CHANNELS),
    "block_out_channels": (_integers, 1, MAX_CHANNELS),
    "norm_num_groups": (_integer, 1, MAX_CHANNELS),
    "attention_head_dim": (_integer, 1, MAX_CHANNELS),
    "num_attention_heads": (_integer, 1, MAX_CHANNELS),
    "layers_per_block": (_integer, 1, 64),
    "num_layers": (_integer, 1, 1024),
    "patch_size": (_integer, 1, 256),
    "sample_size": (_size, 1, MAX_SIZE),
    "num_class_embeds": (_integer, 1, MAX_CLASSES),
    "num_embeds_ada_norm": (_integer, 1, MAX_CLASSES),
    "scaling_factor": (_number, 0.0, math.inf),
    "shift_factor": (_number, -math.inf, math.inf),
    "num_train_timesteps": (_integer, 2, MAX_TIMESTEPS),
    "beta_start": (_number, 0.0, 1.0),
    "beta_end": (_number, 0.0, 1.0),
    "beta_schedule": (_choice, *BETA_SCHEDULES),
    "trained_betas": (_betas,),
    "prediction_type": (_choice, *PREDICTION_TYPES),
    "clip_sample": (_flag,),
    "clip_sample_range": (_number, 0.0, math.inf),
    "rescale_betas_zero_snr": (_flag,),
    # SD3: the transformer's text widths and position table, the flow scheduler's shift
    "joint_attention_dim": (_integer, 1, MAX_CHANNELS),
    "caption_projection_dim": (_integer, 1, MAX_CHANNELS),
    "pooled_projection_dim": (_integer, 1, MAX_CHANNELS),
    "pos_embed_max_size": (_integer, 1, MAX_SIZE),
    "shift": (_number, 0.0, math.inf),
    "base_shift": (_number, -math.inf, math.inf),
    "max_shift": (_number, -math.inf, math.inf),
    "use_dynamic_shifting": (_flag,),
}


def check_config(path: Path | str, config: dict) -> None:
    """ValueError (one line naming `path` and the field) unless every field of RULES present in
    `config` (and not null) is of its type and in its range; trained_betas must give one β per
    training timestep."""
    for field, (check, *args) in RULES.items():
        value = config.get(field)
        problem = None if value is None else check(value, *args)
        if problem:
            raise ValueError(f"{path}: {field} {problem}, got {_short(value)}")
    betas, steps = config.get("trained_betas"), config.get("num_train_timesteps")
    if betas is not None and steps is not None and len(betas) != steps:
        raise ValueError(f"{path}: trained_betas has {len(betas)} entries, num_train_timesteps "
                         f"says {steps}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
