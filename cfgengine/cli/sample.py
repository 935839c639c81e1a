"""`cfgengine sample`: a guided grid, one row per class and one panel per w."""
from __future__ import annotations

import re
import sys
import time

import numpy as np
import torch

from cfgengine import distributed, provenance
from cfgengine.atomic import atomic_paths, check_distinct, check_writable
from cfgengine.adapters import SCHEDULES
from cfgengine.cli.args import UserError, add_model_flag, comma_list, guidance_weights
from cfgengine.cli.budget import plan_batch
from cfgengine.figures import save_panels, to_uint8_images
from cfgengine.guidance import APG, CFG, RULE_NAMES, DynamicThreshold, ZeroStar
from cfgengine.model import ModelInfo, info as model_info
from cfgengine.registry import BUILTINS, load
from cfgengine.precision import PRECISIONS
from cfgengine.backends import BACKENDS
from cfgengine.sampler import Sampler
from cfgengine.schedule import GRIDS
from cfgengine.tables import SAMPLERS
from cfgengine.threads import apply_to_torch

GUIDANCE = tuple(RULE_NAMES)
APG_FLAGS = {"apg_eta": "eta", "apg_momentum": "momentum", "apg_norm": "norm_threshold"}


def add(sub) -> None:
    p = sub.add_parser("sample", help="sample a guided grid (one row per class, one panel per w)",
                       description="Sample a model with classifier-free guidance and write a PNG "
                                   "grid: one row per class, one labelled panel per guidance "
                                   "weight w (and, with --npz, the images as uint8 arrays). "
                                   "Samplers, grids and rules: docs/samplers.md.")
    add_model_flag(p, "model file, diffusers folder, Hugging Face hub id (org/name) or built-in "
                   "name; default-distilled is default's guidance-distilled student: one B-row "
                   "forward per step, 1.8-1.9× the images/s at the same FID interval on shapes at "
                   "T = 8-16 (docs/studies.md §3)")
    p.add_argument("--w", type=guidance_weights(), default=[0.3],
                   help="guidance weight w of the paper (diffusers' guidance_scale = 1 + w); "
                        "a comma list gives one panel per w (default: 0.3)")
    p.add_argument("--steps", type=int, default=256, help="sampling steps T ≥ 2 (default: 256)")
    p.add_argument("--sampler", "--solver", dest="sampler", choices=SAMPLERS, default="ancestral",
                   help="the sampling algorithm (--solver is an old spelling). For the paper's "
                        "quality at the least cost use --sampler dpmpp_2m --steps 16: it matched "
                        "the 256-step ancestral FID at w >= 1 in our study, and no other sampler "
                        "matched with fewer evaluations (docs/studies.md); at small w (0.3) keep ancestral. On the "
                        "cosine grid avoid heun and dpmpp_3m_sde (they diverge over the default "
                        "λ range); dpmpp_2m_sde needs --steps 32 and unipc 16, at w >= 1")
    p.add_argument("--variance", "--v", dest="v", type=float, default=0.3,
                   help="the paper's v, ancestral variance interpolation (0 = DDPM's fixed small, "
                        "1 = fixed large; --v is an old spelling torchrun's parser rejects)")
    p.add_argument("--eta", type=float, default=None,
                   help="η ∈ [0, 1] of DDIM (0 = deterministic, 1 = the ancestral step with v = 0) "
                        "and of the ancestral/SDE samplers (their noise share) (default: the "
                        "sampler's: 0 for ddim, 1 for euler_ancestral, dpmpp_2s_ancestral, "
                        "dpmpp_2m_sde, dpmpp_3m_sde)")
    add_grid_flags(p)
    add_guidance_flags(p)
    p.add_argument("--classes", type=comma_list(int, "--classes"), default=None,
                   help="class ids (default: all)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt, for a model conditioned on prompts (a Stable Diffusion "
                        "folder); repeat for more: one figure row per prompt")
    p.add_argument("--negative-prompt", action="append", default=None,
                   help="the null branch of guidance instead of the empty prompt: once for "
                        "every --prompt, or once per --prompt in their order")
    p.add_argument("--per-class", "--n", dest="n", type=int, default=None,
                   help="samples per class or prompt (--n is an old spelling that torchrun's own "
                        "parser rejects as ambiguous)")
    p.add_argument("--batch", type=int, default=None, help="rows per forward (default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed: sample i depends only on (seed, i, its class, w, settings) "
                        "(default: 0)")
    p.add_argument("--first-id", type=int, default=0,
                   help="noise key of the first row (rows get FIRST-ID, FIRST-ID+1, …): with "
                        "--classes C --n 1 --first-id K, regenerates row K of a larger run "
                        "alone (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: the model's)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto = cudagraph on CUDA; on CPU onnxruntime when installed (the "
                        "[onnx] extra; graph exported once and cached), else torch; exported "
                        "files use their own")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="network precision (default fp32, or an exported file's own); the step "
                        "is always fp32")
    p.add_argument("--init", default=None, metavar="FILE",
                   help="image-to-image: start every row from this image (PNG/JPEG, resized to "
                        "the model's size) or from an .npy/.npz array [*S] or [rows, *S] in "
                        "[-1, 1]; needs --strength")
    p.add_argument("--strength", type=float, default=None,
                   help="image-to-image strength s ∈ (0, 1]: the run starts at step T − ⌊s·T⌋ "
                        "(diffusers' convention; 1 = from noise)")
    p.add_argument("--out", default="samples.png", help="the figure (PNG; default: samples.png)")
    p.add_argument("--npz", default=None, help="also write arr_0 (uint8 NHWC) + labels")
    p.set_defaults(run=run)


def read_init(path: str | None, shape: tuple[int, ...], rows: int) -> torch.Tensor | None:
    """The --init images as float [rows, *S] in [-1, 1]: an image file (resized, its channels
    converted) or an array of one image or one per row."""
    if path is None:
        return None
    try:
        if path.endswith((".npy", ".npz")):
            data = np.load(path, allow_pickle=False)
            array = data[data.files[0]] if path.endswith(".npz") else data
            x = torch.as_tensor(np.asarray(array, dtype=np.float32))
        else:
            x = _image_file(path, shape)
    except (OSError, ValueError) as err:
        raise UserError(f"--init {path}: cannot read it ({err})") from None
    if tuple(x.shape) == tuple(shape):
        x = x.expand(rows, *shape)
    if tuple(x.shape) != (rows, *shape):
        raise UserError(f"--init {path}: shape {tuple(x.shape)}; the model samples "
                        f"{tuple(shape)} (one image, or {rows} of them)")
    return x.contiguous()


def _image_file(path: str, shape: tuple[int, ...]) -> torch.Tensor:
    """An image file as float [C, H, W] in [-1, 1] at the model's size and channel count."""
    from PIL import Image

    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"the model samples {tuple(shape)}, not images; give an .npy array")
    channels, height, width = shape
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB").resize((width, height))
        array = np.asarray(image, dtype=np.float32).reshape(height, width, channels)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def add_grid_flags(p) -> None:
    p.add_argument("--grid", choices=GRIDS, default="cosine",
                   help="λ grid: cosine (Algorithm 2, default), cosine-authors (the authors' "
                        "code), uniform (in λ), karras (ρ = 7)")
    p.add_argument("--logsnr-range", type=number_pair("--logsnr-range", finite=True),
                   default=None, metavar="LO,HI",
                   help="λ range of the grid (default: the model's, else -20,20)")
    p.add_argument("--schedule", choices=SCHEDULES, default="consistent",
                   help="a diffusers folder's own timesteps: consistent (each state stepped to "
                        "the next timestep, default) or pipeline (diffusers DDIM's exact pairs, "
                        "docs/models.md)")


def add_guidance_flags(p) -> None:
    p.add_argument("--guidance", choices=GUIDANCE, default="cfg",
                   help="guidance rule: cfg (eq. 6), zero_star (CFG-Zero*), apg (adaptive "
                        "projected guidance); default cfg")
    p.add_argument("--rescale", type=float, default=None,
                   help="cfg: rescale φ ∈ [0, 1] (Lin et al. 2023; diffusers guidance_rescale)")
    p.add_argument("--refresh", type=int, default=None, metavar="K",
                   help="cfg: run the null branch on every K-th guided step only and reuse its "
                        "Δ = ε_c − ε_u between (B rows instead of 2B; default 1 = every step). "
                        "K = 2 kept the doubled batch's FID interval at T ≥ 8 for w ≤ 2 at "
                        "~1.3× the images/s; K ≥ 3 needs T ≥ 16 (docs/studies.md §3)")
    p.add_argument("--interval", type=number_pair("--interval"), default=None, metavar="LO,HI",
                   help="guide only on steps with LO ≤ λ ≤ HI (the net runs B rows elsewhere)")
    p.add_argument("--apg-eta", type=float, default=None, help="apg: weight η of Δ∥ (default 0)")
    p.add_argument("--apg-momentum", type=float, default=None,
                   help="apg: momentum β ∈ (−1, 1) (default 0)")
    p.add_argument("--apg-norm", type=float, default=None,
                   help="apg: norm threshold r ≥ 0, 0 = off (default 0)")
    p.add_argument("--threshold", type=threshold, default=None, metavar="P[,MAX]",
                   help="dynamic thresholding (Imagen): quantile P ∈ (0, 1], bound MAX ≥ 1 "
                        "(default 1); replaces the model's clip")
    # "-0.95,3.32" is a value, not a flag (Python ≥ 3.12 already reads it so)
    p._negative_number_matcher = re.compile(r"^-\.?\d")


def number_pair(flag: str, finite: bool = False):
    """argparse type: exactly two comma-separated numbers LO,HI."""
    parse_list = comma_list(float, flag, finite=finite)

    def parse(text: str) -> tuple[float, float]:
        values = parse_list(text)
        if len(values) != 2:
            raise UserError(f"{flag} takes two numbers LO,HI, got {text!r}")
        return tuple(values)
    return parse


def threshold(text: str) -> DynamicThreshold:
    """--threshold P[,MAX] → DynamicThreshold(p, max_value)."""
    values = comma_list(float, "--threshold", finite=True)(text)
    if len(values) > 2:
        raise UserError(f"--threshold takes P or P,MAX, got {text!r}")
    try:
        return DynamicThreshold(*values)
    except ValueError as err:  # argparse would swallow the reason of a ValueError
        raise UserError(f"--threshold: {err}") from None


def guidance_rule(args):
    """The rule the guidance flags describe; a flag of another rule is a user error."""
    for flag in ("rescale", "refresh"):
        if getattr(args, flag) is not None and args.guidance != "cfg":
            raise UserError(f"--{flag} applies to --guidance cfg, not {args.guidance}")
    given = {field: getattr(args, flag) for flag, field in APG_FLAGS.items()
             if getattr(args, flag) is not None}
    if given and args.guidance != "apg":
        flag = next(f for f, field in APG_FLAGS.items() if field in given)
        raise UserError(f"--{flag.replace('_', '-')} applies to --guidance apg, "
                        f"not {args.guidance}")
    try:
        if args.guidance == "apg":
            return APG(**given, interval=args.interval)
        if args.guidance == "zero_star":
            return ZeroStar(interval=args.interval)
        return CFG(rescale=0.0 if args.rescale is None else args.rescale, interval=args.interval,
                   refresh=1 if args.refresh is None else args.refresh)
    except ValueError as err:
        raise UserError(f"--guidance {args.guidance}: {err}") from None


def sample_classes(facts: ModelInfo, classes: list[int] | None,
                   n: int | None) -> tuple[list[int], int]:
    """(class ids, samples per class), checked; nothing allocated (the memory budget is next)."""
    classes = list(range(facts.num_classes)) if classes is None else classes
    if not classes:
        raise UserError("--classes: give at least one class id")
    bad = [k for k in classes if not 0 <= k < facts.num_classes]
    if bad:
        raise UserError(f"--classes: class {bad[0]} is outside [0, {facts.num_classes})")
    return classes, per_class(n, facts)


def per_class(n: int | None, facts: ModelInfo) -> int:
    """Samples per class or prompt (default: 400 points or 4 images)."""
    if n is None:
        n = 400 if len(facts.sample_shape) == 1 else 4
    if n < 1:
        raise UserError(f"--per-class/--n must be ≥ 1, got {n}")
    return n


def figure_rows(args, facts: ModelInfo) -> tuple[list[int], list[str], int]:
    """(the figure's rows: class ids, or prompt indices; the names of ids; samples per row),
    checked; nothing allocated."""
    if facts.conditioning != "text":
        if args.prompt or args.negative_prompt:
            raise UserError(f"--prompt: {args.ckpt} is a class-conditional model; choose classes "
                            "with --classes")
        classes, n = sample_classes(facts, args.classes, args.n)
        return classes, list(facts.class_names) or [f"class {k}" for k in
                                                    range(facts.num_classes)], n
    prompts, _ = prompt_flags(args)
    names = [p if len(p) <= 24 else p[:23] + "…" for p in prompts]  # the figure's row labels
    return list(range(len(prompts))), names, per_class(args.n, facts)


def prompt_flags(args) -> tuple[list[str], list[str]]:
    """(the --prompt values, a --negative-prompt for each), checked."""
    if args.classes is not None:
        raise UserError(f"--classes: {args.ckpt} is conditioned on prompts; give --prompt")
    prompts, negatives = args.prompt or [], args.negative_prompt or [""]
    if not prompts:
        raise UserError(f"{args.ckpt} is conditioned on prompts: give at least one --prompt")
    if len(negatives) not in (1, len(prompts)):
        raise UserError(f"--negative-prompt: give one for all prompts or one per --prompt "
                        f"({len(prompts)}), got {len(negatives)}")
    return prompts, negatives * len(prompts) if len(negatives) == 1 else negatives


def conditions(args, facts: ModelInfo, labels: torch.Tensor) -> dict:
    """What the Sampler is given for every panel's rows (`labels`: the figure's row of each
    sample): class labels, or prompts and negative prompts."""
    rows = labels.repeat(len(args.w))
    if facts.conditioning != "text":
        return {"labels": rows}
    prompts, negatives = prompt_flags(args)
    return {"labels": None, "prompts": [prompts[k] for k in rows.tolist()],
            "negative_prompts": [negatives[k] for k in rows.tolist()]}


def check_output_flags(args) -> None:
    """Outputs writable, regular, and distinct from each other and from the model file."""
    for flag in ("out", "npz"):
        if getattr(args, flag) is not None and distributed.is_main():
            check_writable(getattr(args, flag), f"--{flag}")
    model_file = None if args.ckpt in BUILTINS else args.ckpt
    check_distinct({"--out": args.out, "--npz": args.npz}, {"--ckpt": model_file})


def sample_ids(first_id: int, rows: int) -> torch.Tensor:
    """FIRST-ID, FIRST-ID+1, … : the noise keys of the rows (sampler `sample_ids`)."""
    if not 0 <= first_id < 2**63 - rows:
        raise UserError(f"--first-id must be in [0, 2^63 − {rows}), got {first_id}")
    return torch.arange(rows, dtype=torch.int64) + first_id


@distributed.command  # under torchrun: each rank samples its shard of ids, rank 0 writes
def run(args) -> int:
    check_output_flags(args)
    apply_to_torch()  # one thread per available core, or CFGENGINE_THREADS / OMP_NUM_THREADS
    rule = guidance_rule(args)
    model = load(args.ckpt, trust_code=args.trust_code, schedule=args.schedule)
    distributed.agree_on("the model", lambda: provenance.derivation(model))  # under torchrun
    facts = model_info(model)
    blocks, names, n = figure_rows(args, facts)
    engine = Sampler(model, device=distributed.local_device(args.device), backend=args.backend,
                     precision=args.precision)
    rows = len(blocks) * n * len(args.w)
    batch = plan_batch(rows, facts.sample_shape, args.steps, args.batch, engine.device,
                       n_flag="--per-class/--n")  # before anything of `rows` size is allocated
    labels = torch.tensor(blocks).repeat_interleave(n)  # one block of n rows per class or prompt
    cond = conditions(args, facts, labels)
    ids = sample_ids(args.first_id, rows)
    w = torch.tensor(args.w).repeat_interleave(len(labels))  # one batch covers every panel
    start = time.perf_counter()
    x = distributed.sample_rows(engine, cond.pop("labels"), w, **cond, steps=args.steps,
                                sampler=args.sampler, v=args.v, eta=args.eta, grid=args.grid,
                                logsnr_range=args.logsnr_range, guidance=rule,
                                clip="auto" if args.threshold is None else args.threshold,
                                seed=args.seed, sample_ids=ids, batch_size=batch,
                                init=read_init(args.init, facts.sample_shape, rows),
                                strength=args.strength,
                                progress=sys.stderr.isatty() and distributed.is_main())
    seconds = time.perf_counter() - start
    if x is None:
        return 0  # not rank 0: it writes
    decode = engine.info.decode  # latent models: the PNG and --npz hold images
    write_outputs(args, names, (decode(x) if decode else x).cpu(), labels)
    runtime = engine.model.runtime  # what ran: auto may have run eager torch
    print(f"{len(x)} samples, {args.steps} steps, {seconds:.2f} s, {len(x) / seconds:.1f} "
          f"samples/s, backend {runtime}, device {engine.device}, precision {engine.precision}"
          f" -> {args.out}")
    return 0


def write_outputs(args, names: list[str], x: torch.Tensor, labels: torch.Tensor) -> None:
    """The PNG grid (a row per class or prompt, named) and the optional npz, both or neither."""
    chunks = x.split(len(labels))
    with atomic_paths(args.out, args.npz) as (png, npz):  # both appear, or neither
        if npz is not None:
            write_npz(npz, x, labels.repeat(len(args.w)), np.asarray(args.w))
        save_panels(png, [(w, xs, labels) for w, xs in zip(args.w, chunks)], names)


def write_npz(path: str, x: torch.Tensor, labels: torch.Tensor, w: np.ndarray) -> None:
    arr = to_uint8_images(x) if x.dim() == 4 else x.numpy()
    with open(path, "wb") as f:
        np.savez(f, arr_0=arr, labels=labels.numpy(), w=w)
