"""Diffusers models as cfgengine Denoisers (docs/design.md, "Models people already have").

A class-conditional `UNet2DModel` or DiT (`DiTTransformer2DModel`) is trained on integer timesteps
j = 0..N−1 of a DDPM schedule ᾱ_j; cfgengine conditions on λ. The adapter maps λ to a fractional
timestep by linear interpolation in λ_j = log(ᾱ_j/(1 − ᾱ_j)) between trained timesteps, converts
the model's prediction (epsilon, v_prediction, sample) to ε exactly, keeps the first C channels of
a learned-variance output (the ancestral sampler uses its own variance, not the learned one), and
maps cfgengine's null label K = num_classes to the model's null class embedding.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cfgengine.folder_config import PREDICTION_TYPES, check_config
from cfgengine.logs import quiet_logger
from cfgengine.model import ModelInfo
from cfgengine.schedule import alpha_sigma

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
MODEL_COMPONENTS = ("unet", "transformer")  # where a pipeline folder keeps its denoising net
MIN_ALPHAS_CUMPROD = 2.0**-24  # zero terminal SNR (ᾱ = 0, λ = −∞) is floored, as diffusers does


def logsnr_of_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """λ_j = log(ᾱ_j/(1 − ᾱ_j)) in float64, decreasing in the timestep j."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp_min(MIN_ALPHAS_CUMPROD)
    return torch.log(abar) - torch.log1p(-abar)


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SCHEDULES = ("consistent", "pipeline")


@dataclass(frozen=True)
class TimestepSchedule:
    """How a folder's scheduler walks its N trained timesteps in T steps (its scheduler_config):
    `spacing` and `steps_offset` place the timesteps t_i; the last step lands on ᾱ = 1 (x̂) when
    `set_alpha_to_one`, else on ᾱ of timestep 0. `schedule` "consistent" (the default) steps each
    state to the next t_{i+1}, where the net then sees it; "pipeline" reproduces diffusers' DDIM
    pairs exactly: it steps to t_i − ⌊N/T⌋, which differs from t_{i+1} with trailing or linspace
    spacing when T does not divide N, yet evaluates the next step at t_{i+1} (docs/models.md)."""

    spacing: str = "trailing"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    schedule: str = "consistent"

    def __post_init__(self):
        if self.spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, "
                             f"got {self.spacing!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got "
                             f"{self.schedule!r}")

    @classmethod
    def from_config(cls, config: dict, schedule: str = "consistent") -> "TimestepSchedule":
        return cls(str(config.get("timestep_spacing") or "leading"),
                   int(config.get("steps_offset") or 0),
                   bool(config.get("set_alpha_to_one", True)), schedule)

    def timesteps(self, num_train_timesteps: int, steps: int) -> torch.Tensor:
        """int64 [T], decreasing: the t_i diffusers' DDIMScheduler.set_timesteps gives."""
        n = num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= n:
            raise ValueError(f"steps must be an integer in [2, {n}] (the model's trained "
                             f"timesteps), got {steps!r}")
        if self.spacing == "linspace":
            timesteps = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
        elif self.spacing == "leading":
            timesteps = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64)
            timesteps = timesteps + self.steps_offset
        else:
            timesteps = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        if timesteps.max() >= n or np.any(timesteps[1:] >= timesteps[:-1]):
            raise ValueError(f"{self.spacing} spacing with steps_offset {self.steps_offset} "
                             f"gives no {steps} distinct trained timesteps out of {n}")
        return torch.from_numpy(timesteps.copy())

    def final_logsnr(self, logsnr_table: torch.Tensor) -> float:
        """Where the last step lands: +∞ (ᾱ = 1, x̂) or λ of timestep 0."""
        return math.inf if self.set_alpha_to_one else float(logsnr_table[0])

    def steps_to(self, logsnr_table: torch.Tensor, steps: int) -> torch.Tensor:
        """float64 [T]: the λ DDIM steps each t_i to, t_i − ⌊N/T⌋ (the final λ below 0)."""
        n = logsnr_table.numel()
        previous = self.timesteps(n, steps) - n // steps
        final = logsnr_table.new_tensor(self.final_logsnr(logsnr_table))
        return torch.where(previous >= 0, logsnr_table[previous.clamp_min(0)], final)


class TimestepMap(nn.Module):
    """λ [N] → fractional timestep t [N]: linear interpolation in λ between trained timesteps.

    Built from ONNX-exportable ops only (a comparison count over the [J] table, gathers, a lerp):
    no searchsorted, no data-dependent Python branch. λ outside the trained range is clamped.
    """

    def __init__(self, logsnr_table: torch.Tensor):
        super().__init__()
        if logsnr_table.numel() < 2 or not bool((logsnr_table[1:] < logsnr_table[:-1]).all()):
            raise ValueError("the training schedule's log-SNR must strictly decrease over at least "
                             "two timesteps (every beta in (0, 1))")
        self.register_buffer("logsnr_table", logsnr_table.to(torch.float32))

    def _apply(self, fn, recurse=True):
        # The table stays float32 when the net is cast to fp16/bf16 (export): in half precision
        # λ_j would be rounded by up to 0.01, moving t by whole timesteps near the ends.
        table = self.logsnr_table
        super()._apply(fn, recurse)
        self.logsnr_table = table.to(self.logsnr_table.device)
        return self

    def forward(self, logsnr: torch.Tensor) -> torch.Tensor:
        table = self.logsnr_table  # (J,) decreasing
        lam = torch.clamp(logsnr.to(table.dtype), min=table[-1], max=table[0])  # (N,)
        above = (table[None, :] > lam[:, None]).sum(dim=1)  # (N,) timesteps with λ_j > λ
        j = torch.clamp(above - 1, min=0, max=table.shape[0] - 2)  # λ_j ≥ λ ≥ λ_{j+1}
        lam_j, lam_next = table[j], table[j + 1]
        return j.to(table.dtype) + (lam_j - lam) / (lam_j - lam_next)


class LatentDecoder:
    """Latents → images in [−1, 1] through an AutoencoderKL: vae.decode(x/scaling + shift).

    Held as a plain attribute, outside the denoiser's module tree, so exports and weight hashes
    contain the denoiser only; it moves to the device of the latents it decodes."""

    def __init__(self, vae: nn.Module):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def __call__(self, x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        vae = self.vae.to(x.device)
        dtype = next(vae.parameters()).dtype
        with torch.inference_mode():
            parts = [vae.decode((chunk / self.scaling_factor + self.shift_factor).to(dtype)).sample
                     for chunk in x.split(batch_size)]
        return torch.cat(parts).float().clamp(-1.0, 1.0)


class ScheduledNet(nn.Module):
    """What every diffusers net driven on λ shares: the training schedule ᾱ_j (λ → the net's
    fractional timestep), its prediction converted to ε, the model's own grid, the λ range and an
    optional VAE decoder. Subclasses add the conditioning and `forward`."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor, *,
                 sample_shape: tuple[int, ...], prediction_type: str = "epsilon",
                 clip: float | None = None, decoder: LatentDecoder | None = None,
                 schedule: TimestepSchedule = TimestepSchedule()):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {prediction_type!r}")
        self.net = net.eval().requires_grad_(False)
        logsnr = logsnr_of_alphas_cumprod(alphas_cumprod)  # (J,) float64
        self.timestep_map = TimestepMap(logsnr)
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.prediction_type = prediction_type
        self.clip = clip
        self.logsnr_range = (float(logsnr[-1]), float(logsnr[0]))
        self.num_train_timesteps = int(logsnr.numel())
        self._logsnr_table64 = logsnr
        self.decoder = decoder
        self.schedule = schedule

    def eps_from_prediction(self, prediction: torch.Tensor, z: torch.Tensor,
                            logsnr: torch.Tensor) -> torch.Tensor:
        """ε from the net's output: epsilon as is; v: ε = σ·z + α·v; sample: ε = (z − α·x)/σ."""
        if self.prediction_type == "epsilon":
            return prediction
        alpha, sigma = alpha_sigma(logsnr.float().reshape((-1,) + (1,) * (z.dim() - 1)))
        if self.prediction_type == "v_prediction":
            return sigma * z + alpha * prediction
        return (z - alpha * prediction) / sigma

    def logsnr_grid(self, steps: int) -> torch.Tensor:
        """float64 λ [T] of the scheduler's own timesteps (its spacing), increasing in λ."""
        return self._logsnr_table64[self.schedule.timesteps(self.num_train_timesteps, steps)]

    def steps_to(self, steps: int) -> torch.Tensor:
        """float64 λ [T] each step of the own grid steps to, as the pipeline's DDIM does."""
        return self.schedule.steps_to(self._logsnr_table64, steps)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1] from samples x: through the VAE for latent models, else x itself."""
        return x if self.decoder is None else self.decoder(x)

    def schedule_facts(self) -> dict:
        """The ModelInfo fields of the schedule: the own grid and final λ (and, schedule
        "pipeline", the own step pairs), the λ range and the decoder."""
        exact = self.schedule.schedule == "pipeline"
        return dict(logsnr_range=self.logsnr_range, grid=self.logsnr_grid,
                    final_logsnr=self.schedule.final_logsnr(self._logsnr_table64),
                    steps_to=self.steps_to if exact else None, decode=self.decode)


class DiffusersDenoiser(ScheduledNet):
    """A diffusers class-conditional net + its training schedule as a Denoiser (DESIGN §3):
    (z[N, *S], λ[N], labels[N]) → ε[N, *S]; label K = num_classes is the null label."""

    def __init__(self, net: nn.Module, alphas_cumprod: torch.Tensor, *, class_embeddings: int,
                 sample_shape: tuple[int, ...], prediction_type: str = "epsilon",
                 clip: float | None = None, null_label: int | None = None,
                 decoder: LatentDecoder | None = None, class_names: tuple[str, ...] = (),
                 schedule: TimestepSchedule = TimestepSchedule()):
        super().__init__(net, alphas_cumprod, sample_shape=sample_shape,
                         prediction_type=prediction_type, clip=clip, decoder=decoder,
                         schedule=schedule)
        self.register_buffer("label_map", label_map(class_embeddings, null_label))
        self.num_classes = class_embeddings - 1
        self.class_names = tuple(class_names) if len(class_names) == self.num_classes else ()

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.timestep_map(logsnr)  # (N,) fractional timesteps
        x = z.to(self.net.dtype)  # a net cast to fp16 for export takes fp16 input
        out = self.net(x, timestep=t, class_labels=self.label_map[labels], return_dict=False)[0]
        prediction = out[:, : self.sample_shape[0]]  # learned variance: the first C channels
        return self.eps_from_prediction(prediction.float(), z.float(), logsnr).to(z.dtype)

    @property
    def info(self) -> ModelInfo:
        """The model's facts (cfgengine.model): its classes and schedule facts."""
        return ModelInfo(name=type(self.net).__name__, num_classes=self.num_classes,
                         sample_shape=self.sample_shape, clip=self.clip,
                         class_names=self.class_names, **self.schedule_facts(),
                         config=dict(prediction_type=self.prediction_type, net={
                             k: v for k, v in self.net.config.items()
                             if not k.startswith("_")}))  # not _name_or_path: where it lay


def label_map(class_embeddings: int, null_label: int | None) -> torch.Tensor:
    """int64 [K + 1]: cfgengine label k < K → the k-th non-null class embedding, K → the null one
    (default: the last embedding, as diffusers' LabelEmbedding and DiT use)."""
    if class_embeddings < 2:
        raise ValueError(f"a class-conditional model needs ≥ 2 class embeddings (classes + the "
                         f"null one), this one has {class_embeddings}")
    null = class_embeddings - 1 if null_label is None else null_label
    if isinstance(null, bool) or not isinstance(null, int) or not 0 <= null < class_embeddings:
        raise ValueError(f"null_label must be an embedding index in [0, {class_embeddings}), "
                         f"got {null_label!r}")
    classes = [k for k in range(class_embeddings) if k != null]
    return torch.tensor(classes + [null], dtype=torch.int64)


def _diffusers():
    from cfgengine.export.artifact import require  # the optional-dependency import, one place

    return require("diffusers", "diffusers")


def _net_kind(net) -> str:
    """"unet" or "dit"; ValueError for a net cfgengine cannot drive."""
    diffusers = _diffusers()
    if isinstance(net, diffusers.UNet2DModel):
        return "unet"
    if isinstance(net, diffusers.DiTTransformer2DModel) or (
            isinstance(net, diffusers.Transformer2DModel)
            and net.config.get("norm_type") == "ada_norm_zero"):
        return "dit"
    raise ValueError(f"{type(net).__name__} is not a class-conditional UNet2DModel or "
                     "DiTTransformer2DModel")


def class_embeddings(net, kind: str) -> int:
    """The number of class embeddings (classes + the null one); ValueError without any."""
    if kind == "unet":
        config = net.config
        if config.get("class_embed_type") is not None or not config.get("num_class_embeds"):
            raise ValueError("this UNet2DModel has no class embedding table (num_class_embeds "
                             "unset or class_embed_type given): cfgengine needs a "
                             "class-conditional model")
        if config.get("time_embedding_type", "positional") != "positional":
            raise ValueError(f"UNet2DModel time_embedding_type "
                             f"{config.get('time_embedding_type')!r}: cfgengine drives "
                             "positional (DDPM timestep) embeddings only")
        return int(net.class_embedding.num_embeddings)
    tables = [m.embedding_table for m in net.modules()
              if type(m).__name__ == "LabelEmbedding"]  # DiT's CombinedTimestepLabelEmbeddings
    return int(tables[0].num_embeddings)


def sample_shape(net) -> tuple[int, int, int]:
    """(C, H, W) the net denoises; checks that its output is C (ε) or 2C (learned variance)."""
    config = net.config
    channels = int(config.in_channels)
    out = int(config.get("out_channels") or channels)
    if out not in (channels, 2 * channels):
        raise ValueError(f"{type(net).__name__} has {channels} input and {out} output channels; "
                         "cfgengine reads C (ε) or 2C (ε + learned variance) outputs")
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return channels, int(height), int(width)


def from_diffusers(model: nn.Module, scheduler, vae: nn.Module | None = None, *,
                   null_label: int | None = None, class_names: tuple[str, ...] = (),
                   schedule: str = "consistent") -> DiffusersDenoiser:
    """A diffusers UNet2DModel / DiTTransformer2DModel, its scheduler (the training schedule
    ᾱ, prediction_type, clip_sample, and how it walks its timesteps: `TimestepSchedule`) and an
    optional AutoencoderKL → a cfgengine Denoiser."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: cfgengine needs a "
                         "DDPM-family scheduler (the model's training schedule)")
    config = dict(scheduler.config)
    check_config(f"{type(scheduler).__name__} config", config)
    return _adapt(model, alphas_cumprod, config, None if vae is None else LatentDecoder(vae),
                  null_label, class_names, schedule)


def _adapt(net, alphas_cumprod, config: dict, decoder: LatentDecoder | None, null_label,
           class_names, schedule: str = "consistent") -> DiffusersDenoiser:
    kind = _net_kind(net)
    clip = None
    if decoder is None and config.get("clip_sample", False):  # latents are never clipped
        clip = float(config.get("clip_sample_range", 1.0))
    return DiffusersDenoiser(net, alphas_cumprod, class_embeddings=class_embeddings(net, kind),
                             sample_shape=sample_shape(net),
                             prediction_type=config.get("prediction_type") or "epsilon",
                             clip=clip, null_label=null_label, decoder=decoder,
                             class_names=class_names,
                             schedule=TimestepSchedule.from_config(config, schedule))


def is_pipeline_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def load_folder(folder: str | Path, *, schedule: str = "consistent") -> DiffusersDenoiser:
    """A diffusers pipeline folder (model_index.json; unet/ or transformer/, scheduler/, optional
    vae/) → a DiffusersDenoiser on the scheduler's own timesteps (`schedule`: TimestepSchedule);
    ValueError in one line for a folder cfgengine cannot read: the config fields it builds from
    are checked first (cfgengine.folder_config), the weights must fill the net exactly, and any
    other failure while building names the folder."""
    folder = Path(folder)
    if not is_pipeline_folder(folder):
        raise ValueError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    index = _read_json(folder / "model_index.json")
    name = _model_component(folder, index)
    config = _scheduler_config(folder, index)
    for component in (name, "vae"):  # every config before anything is built
        _component_config(folder, component)
    with building(folder):
        net = _load_component(folder, index, name, _model_classes())
        return _adapt(net, training_alphas_cumprod(config), config, vae_decoder(folder, index),
                      None, _class_names(index), schedule)


@contextlib.contextmanager
def building(folder: Path):
    """Any failure while a folder's model is built as one ValueError line naming the folder."""
    try:
        yield
    except ValueError as err:
        raise ValueError(err if str(folder) in str(err) else f"{folder}: {err}") from None
    except Exception as err:  # diffusers' and torch's own errors while building: one line
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{folder}: cannot build the model ({type(err).__name__}: "
                         f"{first})") from None


def _component_config(folder: Path, name: str) -> None:
    """Check a component's config.json (when it has one: from_pretrained reports its absence)."""
    path = folder / name / "config.json"
    if path.is_file():
        check_config(path, _read_json(path))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _model_component(folder: Path, index: dict) -> str:
    for name in MODEL_COMPONENTS:
        if index.get(name):
            return name
    raise ValueError(f"{folder}: model_index.json names no unet or transformer; cfgengine reads "
                     "UNet2DModel and DiTTransformer2DModel pipelines")


def _model_classes() -> dict:
    diffusers = _diffusers()
    return {"UNet2DModel": diffusers.UNet2DModel,
            "DiTTransformer2DModel": diffusers.DiTTransformer2DModel,
            "Transformer2DModel": diffusers.Transformer2DModel}  # older DiT folders say this


def _load_component(folder: Path, index: dict, name: str, classes: dict) -> nn.Module:
    # accelerate only makes loading leaner; without it diffusers warns unless told not to use it
    lean = importlib.util.find_spec("accelerate") is not None
    cls = component_class(folder, index, name, classes)
    try:
        with quiet_logger("diffusers"):  # its "newly initialized" warnings: ours says it in one line
            net, loading = cls.from_pretrained(folder / name, low_cpu_mem_usage=lean,
                                               output_loading_info=True)
    except RuntimeError as err:  # torch's load_state_dict: "size mismatch for KEY: …" lines
        _check_loading(folder / name, {"mismatched_keys": re.findall(
            r"size mismatch for ([\w.]+)", str(err))})
        raise
    _check_loading(folder / name, loading)
    return net.eval()


def component_class(folder: Path, index: dict, name: str, classes: dict) -> type:
    """The class model_index.json names for component `name`, one of `classes` ({name: class});
    ValueError in one line for another class or a missing folder."""
    if not names(index, name):
        raise ValueError(f"{folder}: model_index.json names no {name}")
    entry = index[name]
    class_name = entry[-1] if isinstance(entry, list) else str(entry)
    if class_name not in classes:
        raise ValueError(f"{folder}: {name} is a {class_name}; cfgengine reads "
                         f"{' or '.join(classes)} there")
    if not (folder / name).is_dir():
        raise ValueError(f"{folder}: model_index.json names {name}, but there is no {name}/")
    return classes[class_name]


def names(index: dict, name: str) -> bool:
    """Whether model_index.json names component `name` (a folder saved without an optional
    component lists it as [null, null])."""
    entry = index.get(name)
    return bool(entry[-1] if isinstance(entry, list) and entry else entry)


def vae_decoder(folder: Path, index: dict) -> LatentDecoder | None:
    """The folder's AutoencoderKL as a LatentDecoder; None for a folder without one."""
    if not (names(index, "vae") and (folder / "vae").is_dir()):
        return None
    _component_config(folder, "vae")
    return LatentDecoder(_load_component(folder, index, "vae",
                                         {"AutoencoderKL": _diffusers().AutoencoderKL}))


def _check_loading(component: Path, loading: dict) -> None:
    """ValueError naming the weights file and the keys unless the file filled every tensor of
    the net and nothing else (a missing class table would be left random)."""
    problems = [(what, loading.get(key) or []) for what, key in
                (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                 ("mismatched", "mismatched_keys"))]
    problems = [f"{what} {_keys(keys)}" for what, keys in problems if keys]
    if problems:
        weights = next((component / f for f in WEIGHT_FILES if (component / f).is_file()),
                       component)
        raise ValueError(f"{weights}: weights do not match the config ({'; '.join(problems)})")


def _keys(keys: list) -> str:
    names = [str(k[0] if isinstance(k, tuple) else k) for k in keys]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _scheduler_config(folder: Path, index: dict) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    if not index.get("scheduler") or not path.is_file():
        raise ValueError(f"{folder}: no scheduler/scheduler_config.json; cfgengine needs the "
                         "model's training schedule")
    config = _read_json(path)
    check_config(path, config)
    return config


def training_alphas_cumprod(config: dict) -> torch.Tensor:
    """ᾱ [N] of a scheduler config (num_train_timesteps, beta_schedule, betas, trained_betas,
    rescale_betas_zero_snr), computed by diffusers' DDPMScheduler from the config's own keys."""
    ddpm = _diffusers().DDPMScheduler
    accepted = set(inspect.signature(ddpm.__init__).parameters) - {"self"}
    try:
        return ddpm(**{k: v for k, v in config.items() if k in accepted}).alphas_cumprod
    except (NotImplementedError, TypeError) as err:
        raise ValueError(f"scheduler config: {err}") from None


def _class_names(index: dict) -> tuple[str, ...]:
    """DiT folders may carry id2label ({"0": "tench, Tinca tinca", …}): the first name of each."""
    id2label = index.get("id2label")
    if not isinstance(id2label, dict) or not all(str(k).isdigit() for k in id2label):
        return ()
    return tuple(str(id2label[k]).split(",")[0].strip() for k in sorted(id2label, key=int))
