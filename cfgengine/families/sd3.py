"""StableDiffusion3Pipeline-format folders as cfgengine Denoisers (docs/models.md).

SD3 is a flow-matching model, so it runs on cfgengine.families.flow.FlowMatching: its
SD3Transformer2DModel predicts the velocity v = ε − x at x_t = (1 − t)·x + t·ε from the timestep
N·t (N = the scheduler's num_train_timesteps), and its FlowMatchEulerDiscreteScheduler's shifted
grid (`shift`, or μ of the latent size with `use_dynamic_shifting`) is FlowMatching's own grid, on
which DDIM (η = 0) is the pipeline's Euler loop, its first step at t = 1 (λ = −∞).

Its condition is a TextCondition encoded as the pipeline's encode_prompt encodes one: both CLIP
tokenizers pad to the first one's `model_max_length`; the penultimate hidden states of CLIP-L and
CLIP-G are concatenated on features and zero-padded to the T5 width (the transformer's
`joint_attention_dim`), then concatenated on the sequence axis with T5's last hidden state
(256 tokens) — or, in a folder without T5 (model_index.json: [null, null]), with 256 rows of
zeros; the pooled embedding is the two CLIP projections concatenated. No mask: the pipeline passes
the transformer none.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from cfgengine import adapters
from cfgengine.families import text
from cfgengine.families.flow import FlowMatching
from cfgengine.model import ModelInfo, TextCondition

SD3_COMPONENTS = ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "scheduler")  # text_encoder_3 / tokenizer_3 (T5) and vae: optional
T5_LENGTH = 256  # the pipeline's default max_sequence_length
# FlowMatchEulerDiscreteScheduler settings that change its grid or step beyond the shift
UNREAD_SCHEDULER_OPTIONS = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                            "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")
# calculate_shift's line through (image tokens, μ), with the scheduler's defaults
DYNAMIC_SHIFT_DEFAULTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                              max_shift=1.15)


class SD3PromptEncoder:
    """Prompts → TextCondition the way StableDiffusion3Pipeline.encode_prompt encodes them (module
    docstring). `clips`: [(tokenizer, CLIPTextModelWithProjection)] × 2; `t5`: (tokenizer,
    T5EncoderModel) or None; `width`: the transformer's joint_attention_dim. Held as a plain
    attribute, outside the denoiser's module tree; it runs on the device it is asked for."""

    def __init__(self, clips: list, t5: tuple | None, *, width: int,
                 max_sequence_length: int = T5_LENGTH):
        self.clips = [(tokenizer, encoder.eval().requires_grad_(False))
                      for tokenizer, encoder in clips]
        self.t5 = None if t5 is None else (t5[0], t5[1].eval().requires_grad_(False))
        self.width, self.max_sequence_length = int(width), int(max_sequence_length)

    def __call__(self, prompts: list[str], device: torch.device | str = "cpu") -> TextCondition:
        max_length = self.clips[0][0].model_max_length  # the pipeline's, for both CLIPs
        with torch.inference_mode():
            hidden, pooled = zip(*(self._clip(tokenizer, encoder, prompts, max_length, device)
                                   for tokenizer, encoder in self.clips))
            t5 = self._t5(prompts, device, hidden[0].dtype)
        clip = torch.cat(hidden, dim=-1)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextCondition(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    @staticmethod
    def _clip(tokenizer, encoder, prompts, max_length: int, device):
        """(penultimate hidden states [N, L, D], projected pooled embedding [N, P])."""
        ids = text.tokenize(tokenizer, prompts, max_length).input_ids.to(device)
        out = encoder.to(device)(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def _t5(self, prompts, device, dtype: torch.dtype) -> torch.Tensor:
        if self.t5 is None:
            return torch.zeros(len(prompts), self.max_sequence_length, self.width, device=device,
                               dtype=dtype)
        tokenizer, encoder = self.t5
        ids = text.tokenize(tokenizer, prompts, self.max_sequence_length).input_ids.to(device)
        return encoder.to(device)(ids)[0]


class SD3Velocity(nn.Module):
    """An SD3Transformer2DModel as FlowMatching's velocity net: (x_t[N, C, H, W], time[N],
    TextCondition[N]) → v[N, C, H, W], the condition's embeddings as encoder_hidden_states and its
    pooled rows as pooled_projections."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        dtype = self.transformer.dtype
        return self.transformer(hidden_states=x.to(dtype), timestep=time,
                                encoder_hidden_states=cond.embeddings.to(dtype),
                                pooled_projections=cond.pooled.to(dtype), return_dict=False)[0]


class SD3Denoiser(FlowMatching):
    """An SD3 transformer + its flow schedule + its prompt encoder as a Denoiser:
    (z[N, *S], λ[N], TextCondition[N]) → ε[N, *S]. The null branch is an encoded prompt too (the
    negative prompt, "" by default), so the model has no null label."""

    def __init__(self, transformer: nn.Module, encoder: SD3PromptEncoder, *, shift: float,
                 num_train_timesteps: int, dynamic_shift: bool = False,
                 decoder: adapters.LatentDecoder | None = None):
        super().__init__(SD3Velocity(transformer), num_classes=0,
                         sample_shape=adapters.sample_shape(transformer), shift=shift,
                         time_scale=float(num_train_timesteps),
                         num_train_timesteps=num_train_timesteps, dynamic_shift=dynamic_shift,
                         decode=decoder)
        self.encoder = encoder

    def encode(self, prompts: list[str]) -> TextCondition:
        """The prompts' rows, on the device of the transformer."""
        return self.encoder(prompts, device=next(self.net.parameters()).device)

    @property
    def info(self) -> ModelInfo:
        """The flow model's facts (cfgengine.model), prompts in."""
        return dataclasses.replace(super().info, name=type(self.net.transformer).__name__,
                                   conditioning="text", encode=self.encode)


def is_sd3_folder(path: Path) -> bool:
    """A pipeline folder whose model_index.json names a transformer and a text encoder."""
    if not adapters.is_pipeline_folder(path):
        return False
    index = adapters._read_json(path / "model_index.json")
    return adapters.names(index, "transformer") and adapters.names(index, "text_encoder")


def load_folder(folder: str | Path, *, schedule: str = "consistent") -> SD3Denoiser:
    """A StableDiffusion3Pipeline-format folder (transformer: SD3Transformer2DModel, text_encoder
    and text_encoder_2: CLIPTextModelWithProjection, tokenizer and tokenizer_2: CLIPTokenizer,
    scheduler: FlowMatchEulerDiscreteScheduler, optional text_encoder_3: T5EncoderModel with its
    tokenizer_3, optional vae: AutoencoderKL) → an SD3Denoiser on the scheduler's own grid.
    `schedule` is accepted for every folder; "consistent" and "pipeline" coincide here (the Euler
    step goes from each σ to the next). ValueError in one line for a folder cfgengine cannot
    read."""
    folder = Path(folder)
    if schedule not in adapters.SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(adapters.SCHEDULES)}, got "
                         f"{schedule!r}")
    index = adapters._read_json(folder / "model_index.json")
    missing = [name for name in SD3_COMPONENTS if not adapters.names(index, name)]
    if missing:
        raise ValueError(f"{folder}: model_index.json names no {' or '.join(missing)}; cfgengine "
                         "reads StableDiffusion3Pipeline folders (transformer, text_encoder(_2), "
                         "tokenizer(_2), scheduler; text_encoder_3, tokenizer_3 and vae optional)")
    config = _flow_scheduler_config(folder, index)
    adapters._component_config(folder, "transformer")
    with adapters.building(folder):
        transformer = adapters._load_component(
            folder, index, "transformer",
            {"SD3Transformer2DModel": adapters._diffusers().SD3Transformer2DModel})
        shift, dynamic = flow_shift(config, dict(transformer.config))
        return SD3Denoiser(transformer, _prompt_encoder(folder, index, transformer), shift=shift,
                           num_train_timesteps=int(config.get("num_train_timesteps") or 1000),
                           dynamic_shift=dynamic, decoder=adapters.vae_decoder(folder, index))


def _flow_scheduler_config(folder: Path, index: dict) -> dict:
    """The scheduler config, checked: a FlowMatchEulerDiscreteScheduler with no setting that
    changes its grid or step beyond the shift (one line naming the setting)."""
    adapters.component_class(folder, index, "scheduler",
                             {"FlowMatchEulerDiscreteScheduler": None})
    config = adapters._scheduler_config(folder, index)
    for option in UNREAD_SCHEDULER_OPTIONS:
        if config.get(option):
            raise ValueError(f"{folder / 'scheduler' / 'scheduler_config.json'}: {option} is "
                             f"set; cfgengine runs FlowMatchEulerDiscreteScheduler's shifted grid "
                             "(shift, use_dynamic_shifting) only")
    if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise ValueError(f"{folder / 'scheduler' / 'scheduler_config.json'}: time_shift_type "
                         f"must be exponential or linear, got {config['time_shift_type']!r}")
    return config


def flow_shift(config: dict, transformer: dict) -> tuple[float, bool]:
    """(shift, dynamic): the scheduler's `shift`, or with use_dynamic_shifting the shift the
    pipeline computes for the transformer's latent size: μ on the line through (base_image_seq_len,
    base_shift) and (max_image_seq_len, max_shift) at its number of patches, shift = e^μ
    (time_shift_type exponential) or μ (linear)."""
    if not config.get("use_dynamic_shifting"):
        return float(config.get("shift", 1.0)), False
    known = {k: float(v) for k, v in {**DYNAMIC_SHIFT_DEFAULTS, **config}.items()
             if k in DYNAMIC_SHIFT_DEFAULTS and v is not None}
    size = transformer["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    tokens = (height // transformer["patch_size"]) * (width // transformer["patch_size"])
    slope = (known["max_shift"] - known["base_shift"]) \
        / (known["max_image_seq_len"] - known["base_image_seq_len"])
    mu = known["base_shift"] + slope * (tokens - known["base_image_seq_len"])
    return (math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential"
            else mu), True


def _prompt_encoder(folder: Path, index: dict, transformer: nn.Module) -> SD3PromptEncoder:
    transformers = text._transformers()
    projected = {"CLIPTextModelWithProjection": transformers.CLIPTextModelWithProjection}
    with text._quiet(transformers):
        clips = [(text.load_tokenizer(folder, index, f"tokenizer{suffix}"),
                  adapters._load_component(folder, index, f"text_encoder{suffix}", projected))
                 for suffix in ("", "_2")]
        t5 = None
        if adapters.names(index, "text_encoder_3") or adapters.names(index, "tokenizer_3"):
            t5 = (text.load_tokenizer(folder, index, "tokenizer_3", {
                      "T5Tokenizer": transformers.T5Tokenizer,
                      "T5TokenizerFast": transformers.T5TokenizerFast}),
                  adapters._load_component(folder, index, "text_encoder_3",
                                           {"T5EncoderModel": transformers.T5EncoderModel}))
    return SD3PromptEncoder(clips, t5, width=transformer.config.joint_attention_dim)
