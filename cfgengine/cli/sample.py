"""`cfgengine sample`: a guided grid, one row per class and one panel per w."""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from cfgengine.atomic import atomic_paths, check_writable
from cfgengine.cli.args import UserError, add_model_flag, comma_list, guidance_weights
from cfgengine.figures import save_panels, to_uint8_images
from cfgengine.registry import load
from cfgengine.runtime import BACKENDS, PRECISIONS
from cfgengine.sampler import Sampler
from cfgengine.tables import SAMPLERS
from cfgengine.threads import apply_to_torch


def add(sub) -> None:
    p = sub.add_parser("sample", help="sample a guided grid (one row per class, one panel per w)")
    add_model_flag(p)
    p.add_argument("--w", type=guidance_weights(), default=[0.3],
                   help="guidance weight w of the paper (diffusers' guidance_scale = 1 + w); "
                        "a comma list gives one panel per w (default: 0.3)")
    p.add_argument("--steps", type=int, default=256, help="sampling steps T ≥ 2 (default: 256)")
    p.add_argument("--sampler", "--solver", dest="sampler", choices=SAMPLERS, default="ancestral",
                   help="the sampling algorithm (--solver is an old spelling)")
    p.add_argument("--v", type=float, default=0.3, help="ancestral variance interpolation v")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η")
    p.add_argument("--classes", type=comma_list(int, "--classes"), default=None,
                   help="class ids (default: all)")
    p.add_argument("--n", type=int, default=None, help="samples per class")
    p.add_argument("--batch", type=int, default=None, help="rows per forward (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: the model's)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto = cudagraph on CUDA; on CPU onnxruntime when installed (the "
                        "[onnx] extra; graph exported once and cached), else torch; exported "
                        "files use their own")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="network precision (default fp32, or an exported file's own); the step "
                        "is always fp32")
    p.add_argument("--out", default="samples.png", help="the figure (PNG)")
    p.add_argument("--npz", default=None, help="also write arr_0 (uint8 NHWC) + labels")
    p.set_defaults(run=run)


def sample_labels(model, classes: list[int] | None, n: int | None) -> torch.Tensor:
    """One block of n rows per class, in class order."""
    classes = list(range(model.num_classes)) if classes is None else classes
    if not classes:
        raise UserError("--classes: give at least one class id")
    bad = [k for k in classes if not 0 <= k < model.num_classes]
    if bad:
        raise UserError(f"--classes: class {bad[0]} is outside [0, {model.num_classes})")
    if n is None:
        n = 400 if len(model.sample_shape) == 1 else 4
    if n < 1:
        raise UserError(f"--n must be ≥ 1, got {n}")
    return torch.tensor(classes).repeat_interleave(n)


def run(args) -> int:
    for flag in ("out", "npz"):
        if getattr(args, flag) is not None:
            check_writable(getattr(args, flag), f"--{flag}")
    apply_to_torch()  # one thread per available core, or CFGENGINE_THREADS / OMP_NUM_THREADS
    model = load(args.ckpt)
    labels = sample_labels(model, args.classes, args.n)
    engine = Sampler(model, device=args.device, backend=args.backend, precision=args.precision)
    w = torch.tensor(args.w).repeat_interleave(len(labels))  # one batch covers every panel
    start = time.perf_counter()
    x = engine.sample(labels.repeat(len(args.w)), w=w, steps=args.steps, sampler=args.sampler,
                      v=args.v, eta=args.eta, seed=args.seed, batch_size=args.batch,
                      progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    write_outputs(args, model, x.cpu(), labels)
    runtime = getattr(engine.guided_net, "runtime", engine.backend)  # what ran: auto may be eager
    print(f"{len(x)} samples, {args.steps} steps, {seconds:.2f} s, {len(x) / seconds:.1f} "
          f"samples/s, backend {runtime}, device {engine.device}, precision {engine.precision}"
          f" -> {args.out}")
    return 0


def write_outputs(args, model, x: torch.Tensor, labels: torch.Tensor) -> None:
    """The PNG grid and the optional npz, both or neither."""
    names = getattr(model, "class_names", None) or [f"class {k}" for k in
                                                    range(model.num_classes)]
    chunks = x.split(len(labels))
    with atomic_paths(args.out, args.npz) as (png, npz):  # both appear, or neither
        if npz is not None:
            write_npz(npz, x, labels.repeat(len(args.w)), np.asarray(args.w))
        save_panels(png, [(w, xs, labels) for w, xs in zip(args.w, chunks)], names)


def write_npz(path: str, x: torch.Tensor, labels: torch.Tensor, w: np.ndarray) -> None:
    arr = to_uint8_images(x) if x.dim() == 4 else x.numpy()
    with open(path, "wb") as f:
        np.savez(f, arr_0=arr, labels=labels.numpy(), w=w)
