"""Plain-PyTorch training of a class-conditional ε-model with label dropout (Ho & Salimans 2022,
Algorithm 1): u ~ U(0, 1), λ = λ(u), z = α·x + σ·ε, the label replaced by the null label K with
probability p_uncond, loss ‖ε_θ(z, λ, c) − ε‖². AdamW, EMA, gradient clipping, bf16 autocast on
CUDA, atomic checkpoints, and a `--resume` that is bit-identical to an uninterrupted run.

Determinism: every random draw comes from two CPU generators (data, and noise: u, ε, label dropout)
whose states are checkpointed with the step, model, EMA and optimizer.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from cfgengine import checkpoint, distributed
from cfgengine.data import ImageDataset, load_dataset
from cfgengine.schedule import alpha_sigma, sample_logsnr
from cfgengine.unet import UNet, preset

# Settings `--resume` may change; every other one is the checkpoint's (changing it would not resume).
RESUMABLE = ("steps", "out", "ckpt_every", "sample_every", "device", "ema_weights")


def setting(default, help_text: str):
    """A config field whose help text the CLI shows."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The learning rate warms up linearly then stays constant, so a run's
    trajectory does not depend on `steps` and a resumed run may extend it."""

    data: str = setting("shapes", "shapes, digits, gmm, a folder of class folders, or an .npz")
    image_size: int | None = setting(None, "image side for shapes/folder (shapes: 16)")
    preset: str = setting("default", "UNet preset: tiny, small, default, base")
    steps: int = setting(3500, "total optimizer steps")
    batch_size: int = setting(64, "batch per process: under torchrun the global batch is "
                                "batch_size × world size")
    lr: float = setting(1e-3, "AdamW learning rate after warm-up")
    warmup: int = setting(200, "linear learning-rate warm-up steps")
    weight_decay: float = 0.0
    ema_decay: float = setting(0.999, "EMA decay of the exported weights")
    grad_clip: float = setting(1.0, "gradient-norm clipping threshold")
    p_uncond: float = setting(0.1, "probability of replacing the label by the null label")
    seed: int = setting(0, "seeds initialisation, data and noise")
    out: str = setting("runs/default", "run folder: ckpt.pt, samples/, model.safetensors")
    ckpt_every: int = setting(500, "checkpoint period in steps")
    sample_every: int = setting(1000, "sample-grid period in steps")
    sample_steps: int = setting(64, "sampling steps T of the grids")
    sample_w: float = setting(1.0, "guidance weight w of the grids")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1 … (bf16 autocast on CUDA)")
    ema_weights: str | None = setting(None, "EMA weights file (default: OUT/model.safetensors)")

    def __post_init__(self):
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("steps", "batch_size", "ckpt_every", "sample_every", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.grad_clip <= 0 or self.warmup < 0:
            raise ValueError("lr and grad_clip must be positive, warmup ≥ 0")
        check_finite_settings(self)


def check_finite_settings(config: "TrainConfig") -> None:
    """ValueError for a NaN/inf float setting (`--lr inf` or `--grad-clip nan` would train every
    weight to NaN; `--sample-w nan` would fail only at the first grid, after a checkpoint)."""
    for name in ("lr", "weight_decay", "ema_decay", "grad_clip", "p_uncond", "sample_w"):
        if not math.isfinite(getattr(config, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got "
                             f"{getattr(config, name)}")
    if config.weight_decay < 0:
        raise ValueError(f"--weight-decay must be ≥ 0, got {config.weight_decay}")
    if not config.data.strip():
        raise ValueError("--data is empty: give a dataset name, a folder or an .npz file")
    if config.image_size is not None and config.image_size < 1:
        raise ValueError(f"--image-size must be ≥ 1, got {config.image_size}")
    if not 0 <= config.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2^63), got {config.seed}")


@dataclass
class TrainState:
    """A run's config and everything that changes during it; `checkpoint_contents` / `restore`
    round-trip the changing part."""

    config: TrainConfig
    model: UNet
    ema: UNet
    optimizer: torch.optim.Optimizer
    data_rng: torch.Generator
    noise_rng: torch.Generator
    step: int = 0
    net: nn.Module | None = None  # what the loss calls, if not `model`: its DDP wrapper


def drop_labels(labels: torch.Tensor, num_classes: int, p_uncond: float,
                generator: torch.Generator) -> torch.Tensor:
    """Each label replaced by the null label K = num_classes with probability p_uncond."""
    drop = torch.rand(labels.shape, generator=generator) < p_uncond
    return torch.where(drop.to(labels.device), num_classes, labels)


def forward_process(x: torch.Tensor, labels: torch.Tensor, num_classes: int, p_uncond: float,
                    generator: torch.Generator):
    """A training example of Algorithm 1: (z, λ, labels, ε) with λ = λ(u), u ~ U(0, 1),
    z = α·x + σ·ε and each label dropped to the null label with probability p_uncond."""
    n = x.shape[0]
    logsnr = sample_logsnr(n, generator).to(x.device)  # (N,)
    eps = torch.randn(x.shape, generator=generator).to(x.device)
    labels = drop_labels(labels, num_classes, p_uncond, generator)
    alpha, sigma = (t.view(n, *[1] * (x.dim() - 1)) for t in alpha_sigma(logsnr))
    return alpha * x + sigma * eps, logsnr, labels, eps


def diffusion_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, p_uncond: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Algorithm 1's loss: mean ‖ε_θ(α·x + σ·ε, λ, c) − ε‖²."""
    z, logsnr, labels, eps = forward_process(x, labels, model.num_classes, p_uncond, generator)
    return F.mse_loss(model(z, logsnr, labels).float(), eps)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup` steps, then constant."""
    return config.lr * min(1.0, (step + 1) / max(config.warmup, 1))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema ← d·ema + (1 − d)·θ, with d warmed up as min(decay, (1 + step)/(10 + step)) so that short
    runs are not dominated by the initial weights."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - d)


def train_step(state: TrainState, dataset: ImageDataset, config: TrainConfig,
               device: torch.device) -> torch.Tensor:
    """One optimizer step on a fresh batch; returns the (detached) loss."""
    x, labels = dataset.batch(config.batch_size, state.data_rng)
    x, labels = x.to(device), labels.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = diffusion_loss(state.net or state.model, x, labels, config.p_uncond,
                              state.noise_rng)
    return optimizer_step(state, config, loss)


def optimizer_step(state: TrainState, config, loss: torch.Tensor) -> torch.Tensor:
    """Backward, clip to `config.grad_clip`, AdamW at the warmed-up rate, EMA; returns the loss
    detached. `config`: any run config with lr, warmup, grad_clip and ema_decay."""
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(config, state.step)
    state.optimizer.step()
    update_ema(state.ema, state.model, config.ema_decay, state.step)
    state.step += 1
    return loss.detach()


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when available, else the CPU."""
    from cfgengine.backends import check_device

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name, None)  # ValueError for cuda on a CPU-only torch


def new_state(config: TrainConfig, dataset: ImageDataset, device: torch.device) -> TrainState:
    """Freshly initialised model (seeded), its EMA copy, AdamW and the two generators."""
    channels, size, _ = dataset.shape
    torch.manual_seed(config.seed)
    model = UNet(preset(config.preset, num_classes=dataset.num_classes, image_size=size,
                        in_channels=channels))
    return state_for(config, model, device)


def state_for(config, model: UNet, device: torch.device, state_class=None) -> TrainState:
    """`state_class` (TrainState) of `model` on `device`, its EMA copy, AdamW and the two
    generators seeded from `config.seed` (any run config with lr, weight_decay and seed)."""
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                  weight_decay=config.weight_decay)
    data_rng = torch.Generator().manual_seed(config.seed)
    noise_rng = torch.Generator().manual_seed(config.seed + 1)
    return (state_class or TrainState)(config, model, ema, optimizer, data_rng, noise_rng)


def checkpoint_contents(state: TrainState, config: TrainConfig, dataset: ImageDataset) -> dict:
    """The plain dict stored in ckpt.pt (loadable with weights_only=True)."""
    return {"config": checkpoint.config_dict(config),
            "model_config": checkpoint.config_dict(state.model.config),
            "dataset": checkpoint.dataset_dict(dataset.info),
            "model": state.model.state_dict(), "ema": state.ema.state_dict(),
            "optimizer": state.optimizer.state_dict(), "step": state.step,
            "rng": {"data": state.data_rng.get_state(), "noise": state.noise_rng.get_state(),
                    "torch": torch.get_rng_state(),
                    **distributed.rank_streams(state.data_rng, state.noise_rng)}}


def restore(state: TrainState, contents: dict) -> TrainState:
    """Load a checkpoint's model, EMA, optimizer, step and RNG states into a fresh `state`."""
    state.model.load_state_dict(contents["model"])
    state.ema.load_state_dict(contents["ema"])
    state.optimizer.load_state_dict(contents["optimizer"])
    state.data_rng.set_state(contents["rng"]["data"])
    state.noise_rng.set_state(contents["rng"]["noise"])
    torch.set_rng_state(contents["rng"]["torch"])  # dropout, if a preset uses it
    state.step = int(contents["step"])
    return state


def resumed_config(contents: dict, **overrides) -> TrainConfig:
    """The checkpoint's TrainConfig with the RESUMABLE settings in `overrides` applied."""
    saved = dict(contents["config"])
    if "export" in saved:  # checkpoints of cfgengine 0.1 named ema_weights `export`
        saved.setdefault("ema_weights", saved.pop("export"))
    stored = {f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved}
    fixed = set(overrides) - set(RESUMABLE)
    if fixed:
        raise ValueError(f"--resume keeps the checkpoint's {', '.join(sorted(fixed))}; "
                         f"only {', '.join(RESUMABLE)} may change")
    return replace(TrainConfig(**stored), **overrides)


def write_checkpoint(state: TrainState, config: TrainConfig, dataset: ImageDataset) -> Path:
    """OUT/ckpt.pt, atomically, by rank 0 (every rank joins: it gathers their RNG states)."""
    path = Path(config.out) / "ckpt.pt"
    contents = checkpoint_contents(state, config, dataset)
    distributed.on_main(lambda: checkpoint.save_checkpoint(contents, path))
    return path


def write_samples(state: TrainState, config: TrainConfig, dataset: ImageDataset) -> Path:
    """OUT/samples/step_XXXXXX.png: EMA samples, one row per class, at `sample_w`."""
    from cfgengine.figures import save_panels
    from cfgengine.sampler import sample

    per_class = 8
    labels = torch.arange(dataset.num_classes).repeat_interleave(per_class)
    x = sample(state.ema, labels, w=config.sample_w, steps=config.sample_steps, seed=0)
    path = Path(config.out) / "samples" / f"step_{state.step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_panels(path, [(config.sample_w, x.cpu(), labels)], list(dataset.class_names))
    return path


def ema_weights_path(config: TrainConfig) -> Path:
    """Where the EMA weights go at the end: `ema_weights`, else OUT/model.safetensors."""
    return Path(config.ema_weights) if config.ema_weights else Path(config.out) / "model.safetensors"


def train(config: TrainConfig, progress: bool = False) -> TrainState:
    """Train from scratch to `config.steps` (see `run`)."""
    check_outputs(config)
    return run(config, None, progress)


RESUME_KEYS = ("config", "model_config", "dataset", "model", "ema", "optimizer", "step", "rng")


def resume(path: str | Path, progress: bool = False, **overrides) -> TrainState:
    """Continue the run saved in `path` to its (or the overridden) `steps`; bit-identical to a run
    that was never interrupted. `overrides`: RESUMABLE settings only. The run continues in the
    folder that holds `path` (a moved or copied run never touches the original)."""
    contents = checkpoint.read_checkpoint(path)
    checkpoint.require_keys(contents, RESUME_KEYS, path)
    config = resumed_config(contents, **beside_checkpoint(path, contents, overrides))
    check_outputs(config, path)
    return run(config, contents, progress)


def beside_checkpoint(path: str | Path, contents: dict, overrides: dict) -> dict:
    """`overrides` with `out` = the folder of `path` unless given, and a stored `ema_weights`
    inside the stored run folder moved along to the same place inside the new one."""
    overrides = dict(overrides)
    overrides.setdefault("out", str(Path(path).parent))
    saved = contents["config"]
    stored_ema = saved.get("ema_weights", saved.get("export"))
    if "ema_weights" not in overrides and stored_ema:
        try:
            inside = Path(stored_ema).relative_to(Path(saved.get("out", "")))
            overrides["ema_weights"] = str(Path(overrides["out"]) / inside)
        except ValueError:
            pass  # an EMA file outside the run folder is the user's explicit choice
    return overrides


def check_outputs(config: TrainConfig, resume_from: str | Path | None = None) -> None:
    """Before any work: the run folder can be made and written, and the EMA weights file is a
    regular file distinct from the checkpoint, the resumed file and the dataset."""
    from cfgengine.atomic import check_distinct, check_writable

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a run folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out: cannot create or write {out} ({existing} is not writable)")
    ema = ema_weights_path(config)
    if ema.parent.exists() or not ema.parent.is_relative_to(out):
        check_writable(ema, "--ema-weights")
    data = config.data if Path(config.data).is_file() else None
    check_distinct({"--ema-weights": ema}, {"the checkpoint": out / "ckpt.pt",
                                            "--resume": resume_from, "--data": data})


def run(config: TrainConfig, contents: dict | None, progress: bool) -> TrainState:
    """The training loop from a fresh or restored state: checkpoints every `ckpt_every` steps and on
    Ctrl-C, sample grids every `sample_every`, EMA weights written at the end."""
    dataset = distributed.shard_dataset(load_dataset(config.data, config.image_size))
    device = resolve_device(distributed.local_device(config.device))
    state = new_state(config, dataset, device)
    distributed.seed_streams(state.data_rng, state.noise_rng, config.seed)
    if contents is not None:
        restore(state, contents)
        distributed.restore_streams(state.data_rng, state.noise_rng, contents, config.seed)
    state.net = distributed.data_parallel(state.model)
    try:
        with distributed.lockstep():  # DDP's all-reduces run inside
            _loop(state, config, dataset, device, progress)
    except KeyboardInterrupt:
        if distributed.world().size == 1:  # ranks may stop mid-collective: keep the last one
            write_checkpoint(state, config, dataset)  # the exact point to resume from
        raise
    distributed.check_identical(state.ema.parameters(), "EMA weights")
    write_checkpoint(state, config, dataset)
    distributed.on_main(lambda: checkpoint.save_ema_weights(
        state.ema.state_dict(), checkpoint.config_dict(state.model.config),
        checkpoint.dataset_dict(dataset.info), ema_weights_path(config)))
    return state


def _loop(state: TrainState, config: TrainConfig, dataset: ImageDataset, device: torch.device,
          progress: bool) -> None:
    samples = (config.sample_every, lambda: distributed.on_main(
        lambda: write_samples(state, config, dataset)))
    optimization_loop(state, config, device, lambda: train_step(state, dataset, config, device),
                      lambda: write_checkpoint(state, config, dataset), progress, [samples])


def optimization_loop(state: TrainState, config, device: torch.device,
                      step: Callable[[], torch.Tensor], save: Callable[[], object],
                      progress: bool, every: list[tuple[int, Callable[[], object]]] = (),
                      kept: str | None = None) -> None:
    """`step()` (one optimizer step, returning its loss) until `config.steps`; `save()` every
    `config.ckpt_every` steps once the loss is known finite, each (period, hook) of `every` on its
    period; Ctrl-C raises KeyboardInterrupt between whole steps. `kept`: see LossHealth."""
    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=state.step, disable=not progress, unit="step",
               dynamic_ncols=True)
    state.model.train()
    health = LossHealth(state.step, device, kept)
    with deferred_interrupt() as interrupted:
        while state.step < config.steps:
            loss = step()
            health.update(loss)
            bar.update(1)
            if state.step % 10 == 0 or state.step == config.steps:
                health.check(state, config)  # the one host sync of every 10 steps
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if state.step % config.ckpt_every == 0:
                health.check(state, config)
                save()
            for period, hook in every:
                if state.step % period == 0:
                    hook()
            if interrupted.is_set():  # Ctrl-C lands here, between whole steps
                health.check(state, config)
                raise KeyboardInterrupt
    bar.close()
    health.check(state, config)


@contextmanager
def deferred_interrupt():
    """While active, SIGINT only sets the yielded Event; the loop raises KeyboardInterrupt after
    the step in progress completes, so the checkpoint written then holds a consistent state (a
    KeyboardInterrupt mid-step would save RNG states already advanced into the next step)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event  # signal handlers live in the main thread only
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


class LossHealth:
    """A device-side flag ORed with `loss is non-finite` every step (no host sync), read at the
    loop's existing sync points: a non-finite loss stops training before the next checkpoint,
    so the last checkpoint on disk is the last good one."""

    def __init__(self, step: int, device: torch.device, kept: str | None = None):
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.good_step = step  # the last step known to be finite
        self.kept = kept  # where the last checkpoint is, if not in config.out

    def update(self, loss: torch.Tensor) -> None:
        self.bad |= ~torch.isfinite(loss)

    def check(self, state: TrainState, config: TrainConfig) -> None:
        if bool(self.bad):
            raise FloatingPointError(
                f"training loss became NaN/inf between steps {self.good_step + 1} and "
                f"{state.step} (lr {config.lr:g}, grad_clip {config.grad_clip:g}); stopped, the "
                f"last checkpoint {self.kept or 'in ' + config.out} was kept")
        self.good_step = state.step
