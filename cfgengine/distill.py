"""Guidance distillation, stage one of Meng et al. 2023 ("On Distillation of Guided Diffusion
Models"): a student ε_η(z, λ, c, w) learns the teacher's guided prediction

    ε̃_w = (1 + w)·ε_T(z, c) − w·ε_T(z, ∅)     (Ho & Salimans 2022, eq. 6)

so that sampling runs one forward of B rows per step instead of 2B. The student is the teacher's
UNet plus a w embedding whose last layer starts at zero: at step 0 it is exactly the teacher's
conditional ε for every w. Training examples are the teacher's own (Algorithm 1): x from its
dataset, λ = λ(u), z = α·x + σ·ε, w ~ U[0, w_max], and the label dropped to ∅ with the teacher's
p_uncond, where the target is ε_T(z, ∅) whatever w — so the student stays an unconditional model
too. One doubled teacher forward (c and ∅ rows) per batch gives the target.

Plain PyTorch like `cfgengine.train`, sharing its AdamW step, EMA, checkpoints, NaN guard and
Ctrl-C handling; `resume` is bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from cfgengine import checkpoint
from cfgengine.data import ImageDataset, load_dataset
from cfgengine.train import (TrainState, setting, checkpoint_contents, forward_process,
                             optimization_loop, optimizer_step, resolve_device, restore, state_for)
from cfgengine.unet import UNet

# p_uncond of a teacher whose file does not record it: `cfgengine train`'s default (the `default`
# model's)
TRAIN_P_UNCOND = 0.1
RESUMABLE = ("steps", "out", "ckpt", "ckpt_every", "device")
FLAGS = {"steps": "--iters", "batch_size": "--batch"}  # the CLI's names, where not --field-name
RESUME_KEYS = ("config", "model_config", "dataset", "model", "ema", "optimizer", "step", "rng",
               "teacher", "teacher_config")


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run (learning rate: linear warm-up, then constant, as `train`)."""

    teacher: str = setting("default", "teacher: a ckpt.pt, a .safetensors or a built-in name")
    out: str = setting("distilled.safetensors", "the student's EMA weights (.safetensors)")
    ckpt: str | None = setting(None, "resumable checkpoint; unset: OUT with suffix .ckpt.pt")
    data: str | None = setting(None, "training images; unset: the teacher's dataset")
    w_max: float = setting(4.0, "guidance weights w are drawn from U[0, w_max]")
    steps: int = setting(2000, "total optimizer steps")
    batch_size: int = setting(64, "batch (the teacher runs 2× this many rows)")
    lr: float = setting(2e-4, "AdamW learning rate after warm-up")
    warmup: int = setting(100, "linear learning-rate warm-up steps")
    weight_decay: float = 0.0
    ema_decay: float = setting(0.995, "EMA decay of the written weights")
    grad_clip: float = setting(1.0, "gradient-norm clipping threshold")
    p_uncond: float | None = setting(None, "null-label rate; unset: the teacher's, else 0.1")
    seed: int = setting(0, "seeds data, noise and w")
    ckpt_every: int = setting(250, "checkpoint period in steps")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1 … (bf16 autocast on CUDA)")

    def __post_init__(self):
        if not (math.isfinite(self.w_max) and self.w_max > 0):
            raise ValueError(f"--w-max must be a finite number > 0, got {self.w_max}")
        for name in ("steps", "batch_size", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be ≥ 1, got {getattr(self, name)}")
        for name in ("lr", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{flag(name)} must be a finite number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be a finite number ≥ 0, got {self.weight_decay}")
        if self.p_uncond is not None and not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"--p-uncond must be in [0, 1], got {self.p_uncond}")
        if not 0.0 <= self.ema_decay < 1.0 or self.warmup < 0 or not 0 <= self.seed < 2**63:
            raise ValueError("--ema-decay must be in [0, 1), --warmup ≥ 0, --seed in [0, 2^63)")
        if Path(self.out).suffix != ".safetensors":
            raise ValueError(f"--out: the student is written as .safetensors, got {self.out}")


def flag(name: str) -> str:
    """The command-line flag of DistillConfig field `name`."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


@dataclass
class DistillState(TrainState):
    """A training state plus the frozen teacher."""

    teacher: UNet | None = None


def checkpoint_path(config: DistillConfig) -> Path:
    """Where the resumable checkpoint goes: `ckpt`, else OUT with the suffix .ckpt.pt."""
    return Path(config.ckpt) if config.ckpt else Path(config.out).with_suffix(".ckpt.pt")


def load_teacher(spec: str) -> tuple[UNet, float | None]:
    """(teacher UNet, the p_uncond it was trained with if its file records it)."""
    from cfgengine.registry import load

    teacher = load(spec)
    if not isinstance(teacher, UNet):
        raise ValueError(f"--teacher {spec}: distillation needs a cfgengine UNet (a ckpt.pt, a "
                         f".safetensors or `default`), got {type(teacher).__name__}")
    if teacher.guidance_embedded:
        raise ValueError(f"--teacher {spec}: already guidance-distilled; give its teacher")
    p_uncond = None
    if Path(spec).suffix == ".pt":
        p_uncond = checkpoint.read_checkpoint(spec).get("config", {}).get("p_uncond")
    return teacher, p_uncond


def student_of(teacher: UNet) -> UNet:
    """The teacher's UNet with a zero-initialised w embedding, holding the teacher's weights: its
    ε(z, λ, c, w) equals the teacher's ε(z, λ, c) for every w until trained."""
    student = UNet(replace(teacher.config, guidance_embedding=True))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_embed.") for k in missing)
    student.class_names, student.dataset = teacher.class_names, teacher.dataset
    return student


@torch.no_grad()
def guided_target(teacher, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor,
                  w: torch.Tensor) -> torch.Tensor:
    """ε̃_w = (1 + w)·ε_T(z, c) − w·ε_T(z, ∅) per row, from ONE forward of the 2N rows (c; ∅)."""
    null = torch.full_like(labels, teacher.num_classes)
    eps = teacher(torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([labels, null]))
    eps_c, eps_u = eps.float().chunk(2)
    w = w.view(-1, *[1] * (z.dim() - 1))
    return eps_c + w * (eps_c - eps_u)


def distill_loss(student, teacher, x: torch.Tensor, labels: torch.Tensor, w_max: float,
                 p_uncond: float, generator: torch.Generator) -> torch.Tensor:
    """mean ‖ε_η(z, λ, c, w) − ε̃_w‖² on one batch of the forward process, w ~ U[0, w_max]."""
    z, logsnr, labels, _ = forward_process(x, labels, teacher.num_classes, p_uncond, generator)
    w = (torch.rand(x.shape[0], generator=generator) * w_max).to(x.device)
    target = guided_target(teacher, z, logsnr, labels, w)
    return F.mse_loss(student(z, logsnr, labels, w).float(), target)


def distill_step(state: DistillState, dataset: ImageDataset, device: torch.device) -> torch.Tensor:
    """One optimizer step on a fresh batch; returns the (detached) loss."""
    config = state.config
    x, labels = dataset.batch(config.batch_size, state.data_rng)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = distill_loss(state.model, state.teacher, x.to(device), labels.to(device),
                            config.w_max, config.p_uncond, state.noise_rng)
    return optimizer_step(state, config, loss)


def teacher_dataset(config: DistillConfig, teacher: UNet) -> ImageDataset:
    """`data`, else the teacher's dataset, checked against the teacher's classes and shape."""
    spec = config.data or teacher.dataset
    if not spec:
        raise ValueError("the teacher's file names no dataset: give --data")
    dataset = load_dataset(spec, teacher.sample_shape[-1])
    if dataset.shape != tuple(teacher.sample_shape) or dataset.num_classes != teacher.num_classes:
        raise ValueError(f"--data {spec}: {dataset.num_classes} classes of {dataset.shape}, the "
                         f"teacher has {teacher.num_classes} of {tuple(teacher.sample_shape)}")
    return dataset


def new_state(config: DistillConfig, teacher: UNet, device: torch.device) -> DistillState:
    """The student initialised from `teacher` (its w embedding's first layer seeded), its EMA,
    AdamW and the generators."""
    torch.manual_seed(config.seed)
    state = state_for(config, student_of(teacher), device, DistillState)
    state.teacher = teacher.to(device).eval().requires_grad_(False)
    return state


def distill(config: DistillConfig, progress: bool = False) -> DistillState:
    """Distil `config.teacher` into a student, from scratch to `config.steps`."""
    teacher, stored_p_uncond = load_teacher(config.teacher)
    if config.p_uncond is None:
        config = replace(config, p_uncond=TRAIN_P_UNCOND if stored_p_uncond is None
                         else float(stored_p_uncond))
    check_outputs(config)
    return run(config, teacher, None, progress)


def resume(path: str | Path, progress: bool = False, **overrides) -> DistillState:
    """Continue the run saved in `path` (writing its checkpoints back there unless `ckpt` is
    given); bit-identical to a run never interrupted. `overrides`: RESUMABLE settings only."""
    contents = checkpoint.read_checkpoint(path)
    if "teacher" not in contents:
        raise ValueError(f"{path}: not a distillation checkpoint (it holds no teacher)")
    checkpoint.require_keys(contents, RESUME_KEYS, path)
    fixed = set(overrides) - set(RESUMABLE)
    if fixed:
        raise ValueError(f"--resume keeps the checkpoint's {', '.join(map(flag, sorted(fixed)))}; "
                         f"only {', '.join(map(flag, RESUMABLE))} may change")
    saved = {f.name: contents["config"][f.name] for f in fields(DistillConfig)
             if f.name in contents["config"]}
    config = replace(DistillConfig(**saved), **{"ckpt": str(path), **overrides})
    teacher = checkpoint.build_unet(contents["teacher_config"], contents["dataset"],
                                    contents["teacher"], path)
    check_outputs(config, path)
    return run(config, teacher, contents, progress)


def check_outputs(config: DistillConfig, resume_from: str | Path | None = None) -> None:
    """Before any work: the student and checkpoint files can be written, and neither overwrites
    the teacher file or the other; the student is not the resumed checkpoint (which a resumed run
    rewrites in place)."""
    from cfgengine.atomic import check_distinct, check_writable

    ckpt = checkpoint_path(config)
    check_writable(config.out, "--out")
    check_writable(ckpt, "--ckpt")
    teacher = config.teacher if Path(config.teacher).is_file() else None
    check_distinct({"--out": config.out, "--ckpt": ckpt}, {"--teacher": teacher})
    check_distinct({"--out": config.out}, {"--resume": resume_from})


def write_checkpoint(state: DistillState, dataset: ImageDataset) -> Path:
    """The resumable checkpoint, atomically: `train`'s contents plus the teacher's weights, so a
    resumed run needs no teacher file."""
    contents = {**checkpoint_contents(state, state.config, dataset),
                "teacher": state.teacher.state_dict(),
                "teacher_config": checkpoint.config_dict(state.teacher.config)}
    return checkpoint.save_checkpoint(contents, checkpoint_path(state.config))


def run(config: DistillConfig, teacher: UNet, contents: dict | None,
        progress: bool) -> DistillState:
    """The loop from a fresh or restored state: checkpoints every `ckpt_every` steps and on Ctrl-C,
    the student's EMA weights written at the end."""
    dataset = teacher_dataset(config, teacher)
    device = resolve_device(config.device)
    state = new_state(config, teacher, device)
    if contents is not None:
        restore(state, contents)
    try:
        optimization_loop(state, config, device, lambda: distill_step(state, dataset, device),
                          lambda: write_checkpoint(state, dataset), progress,
                          kept=str(checkpoint_path(config)))
    except KeyboardInterrupt:
        write_checkpoint(state, dataset)  # the exact point to resume from
        raise
    write_checkpoint(state, dataset)
    checkpoint.save_ema_weights(state.ema.state_dict(), checkpoint.config_dict(state.model.config),
                                checkpoint.dataset_dict(dataset.info), config.out)
    return state


@torch.no_grad()
def guidance_error(student, teacher, dataset: ImageDataset, ws: list[float], n: int = 256,
                   seed: int = 12345) -> list[dict]:
    """Per w, on n held-out examples of the forward process (conditional labels, λ from the
    training distribution): `mse` = mean ‖ε_η(z, λ, c, w) − ε̃_w‖², `relative` = mse / mean ‖ε̃_w‖²,
    and `vs_blind` = mse / mean ‖ε̃_w − ε_T(z, c)‖², the error of the w-blind initialisation
    (None at w = 0, where that is zero)."""
    gen = torch.Generator().manual_seed(seed)
    x, labels = dataset.batch(n, gen)
    z, logsnr, labels, _ = forward_process(x, labels, teacher.num_classes, 0.0, gen)
    rows = []
    for w in ws:
        w_rows = torch.full((n,), float(w))
        target = guided_target(teacher, z, logsnr, labels, w_rows)
        mse = float((student(z, logsnr, labels, w_rows).float() - target).square().mean())
        blind = float((target - guided_target(teacher, z, logsnr, labels, 0 * w_rows))
                      .square().mean())
        rows.append({"w": float(w), "mse": mse,
                     "relative": mse / float(target.square().mean()),
                     "vs_blind": mse / blind if blind > 0 else None})
    return rows
