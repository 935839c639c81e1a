"""Prompt-conditioned diffusers folders (StableDiffusionPipeline format) as cfgengine Denoisers.

The folder's UNet2DConditionModel is driven on λ like every diffusers net (cfgengine/adapters.py:
λ → its fractional timestep, its prediction → ε); its condition is a `TextCondition` of the
prompts, encoded as the pipeline encodes them: the tokenizer pads to its `model_max_length` and
truncates, the CLIP text encoder's last hidden state is the UNet's `encoder_hidden_states`
(no pooled embedding, no attention mask: the pipeline passes the UNet neither).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from cfgengine import adapters
from cfgengine.model import ModelInfo, TextCondition

TEXT_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")  # vae: optional


class PromptEncoder:
    """Prompts → TextCondition the way StableDiffusionPipeline encodes them. Held as a plain
    attribute, outside the denoiser's module tree (exports and weight hashes hold the denoiser
    only); it runs on the device it is asked for."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)

    def __call__(self, prompts: list[str], device: torch.device | str = "cpu") -> TextCondition:
        tokens = tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length)
        encoder = self.text_encoder.to(device)
        # the pipeline passes the mask to the encoder only when its config asks for it
        mask = tokens.attention_mask.to(device) \
            if getattr(encoder.config, "use_attention_mask", False) else None
        with torch.inference_mode():
            hidden = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return TextCondition(hidden)


class TextDenoiser(adapters.ScheduledNet):
    """A UNet2DConditionModel + its training schedule + its prompt encoder as a Denoiser:
    (z[N, *S], λ[N], TextCondition[N]) → ε[N, *S]. The null branch is an encoded prompt too
    (the negative prompt, "" by default), so the model has no null label."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor, encoder: PromptEncoder, *,
                 sample_shape: tuple[int, ...], prediction_type: str = "epsilon",
                 decoder: adapters.LatentDecoder | None = None,
                 schedule: adapters.TimestepSchedule = adapters.TimestepSchedule()):
        super().__init__(net, alphas_cumprod, sample_shape=sample_shape,
                         prediction_type=prediction_type, decoder=decoder, schedule=schedule)
        self.encoder = encoder

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor,
                cond: TextCondition) -> torch.Tensor:
        t = self.timestep_map(logsnr)  # (N,) fractional timesteps
        dtype = self.net.dtype
        out = self.net(z.to(dtype), t, encoder_hidden_states=cond.embeddings.to(dtype),
                       return_dict=False)[0]
        return self.eps_from_prediction(out.float(), z.float(), logsnr).to(z.dtype)

    def encode(self, prompts: list[str]) -> TextCondition:
        """The prompts' rows, on the device of the UNet."""
        return self.encoder(prompts, device=next(self.net.parameters()).device)

    @property
    def info(self) -> ModelInfo:
        """The model's facts (cfgengine.model): prompts in, its schedule facts."""
        return ModelInfo(name=type(self.net).__name__, num_classes=0,
                         sample_shape=self.sample_shape, conditioning="text",
                         encode=self.encode, **self.schedule_facts())


def is_text_folder(path: Path) -> bool:
    """A pipeline folder whose model_index.json names a text encoder."""
    return adapters.is_pipeline_folder(path) \
        and bool(adapters._read_json(path / "model_index.json").get("text_encoder"))


def load_folder(folder: str | Path, *, schedule: str = "consistent") -> TextDenoiser:
    """A StableDiffusionPipeline-format folder (unet: UNet2DConditionModel, text_encoder:
    CLIPTextModel, tokenizer: CLIPTokenizer, scheduler, optional vae: AutoencoderKL) → a
    TextDenoiser on the scheduler's own timesteps (`schedule`: adapters.TimestepSchedule);
    ValueError in one line for a folder cfgengine cannot read."""
    folder = Path(folder)
    index = adapters._read_json(folder / "model_index.json")
    missing = [name for name in TEXT_COMPONENTS if not index.get(name)]
    if missing:
        raise ValueError(f"{folder}: model_index.json names no {' or '.join(missing)}; cfgengine "
                         "reads StableDiffusionPipeline folders (unet, text_encoder, tokenizer, "
                         "scheduler, vae)")
    diffusers, transformers = adapters._diffusers(), _transformers()
    net = adapters._load_component(folder, index, "unet",
                                   {"UNet2DConditionModel": diffusers.UNet2DConditionModel})
    with _quiet(transformers):
        text_encoder = adapters._load_component(folder, index, "text_encoder",
                                                {"CLIPTextModel": transformers.CLIPTextModel})
    config = adapters._scheduler_config(folder, index)
    return TextDenoiser(net, adapters.training_alphas_cumprod(config),
                        PromptEncoder(load_tokenizer(folder, index), text_encoder),
                        sample_shape=adapters.sample_shape(net),
                        prediction_type=config.get("prediction_type") or "epsilon",
                        decoder=adapters.vae_decoder(folder, index),
                        schedule=adapters.TimestepSchedule.from_config(config, schedule))


def tokenize(tokenizer, prompts: list[str], max_length: int):
    """Token ids (and mask) of the prompts as the pipelines tokenize: padded to `max_length`,
    truncated."""
    return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt")


def clip_tokenizers(transformers) -> dict:
    return {"CLIPTokenizer": transformers.CLIPTokenizer,
            "CLIPTokenizerFast": transformers.CLIPTokenizerFast}


def load_tokenizer(folder: Path, index: dict, name: str = "tokenizer", classes=None):
    """The tokenizer component `name` (a CLIP tokenizer unless other `classes` are given)."""
    classes = classes or clip_tokenizers(_transformers())
    return adapters.component_class(folder, index, name, classes).from_pretrained(folder / name)


@contextlib.contextmanager
def _quiet(transformers):
    """No "Loading weights" progress bar from transformers: a load prints nothing (an error after
    it is then the one line the user sees)."""
    logging = transformers.utils.logging
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def _transformers():
    from cfgengine.export.artifact import require  # the optional-dependency import, one place

    return require("transformers", "diffusers")
