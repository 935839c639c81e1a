"""`cfgengine …` subcommands. Validation happens here, at the edge: a user error is one line on
stderr and exit code 2 — never a traceback, never a half-written output file."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cfgengine.backends import BACKENDS, PRECISIONS
from cfgengine.checkpoint import load
from cfgengine.atomic import atomic_paths, check_writable
from cfgengine.figures import save_panels, to_uint8_images
from cfgengine.sampler import Sampler
from cfgengine.solvers import SAMPLERS

DEFAULT_MODEL = "default"


class UserError(Exception):
    """An error the user caused (bad flag, bad file): reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cfgengine", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cfgengine` console script."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args) or 0
    except (UserError, ValueError, FloatingPointError, OSError) as err:
        print(f"cfgengine: error: {err}", file=sys.stderr)  # one line: no traceback for these
        return 2
    except KeyboardInterrupt:
        print("cfgengine: interrupted", file=sys.stderr)
        return 130


def _float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--w takes a number or a comma list of numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"--w takes finite numbers, got {text!r}")
    return values


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} takes a comma list of integers, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    return _ints(text, "--classes")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample a guided grid (one row per class, one panel per w)")
    p.add_argument("--ckpt", default=DEFAULT_MODEL,
                   help=f"model file or built-in name (default: {DEFAULT_MODEL})")
    p.add_argument("--w", type=_float_list, default=[0.3],
                   help="guidance weight w of the paper (diffusers' guidance_scale = 1 + w); "
                        "a comma list gives one panel per w (default: 0.3)")
    p.add_argument("--steps", type=int, default=256, help="sampling steps T ≥ 2 (default: 256)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ancestral")
    p.add_argument("--v", type=float, default=0.3, help="ancestral variance interpolation v")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η")
    p.add_argument("--classes", type=_int_list, default=None, help="class ids (default: all)")
    p.add_argument("--n", type=int, default=None, help="samples per class")
    p.add_argument("--batch", type=int, default=None, help="rows per forward (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: the model's)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto = cudagraph on CUDA, torch on CPU; exported files use their own")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="network precision (default fp32, or an exported file's own); the step "
                        "is always fp32")
    p.add_argument("--out", default="samples.png", help="the figure (PNG)")
    p.add_argument("--npz", default=None, help="also write arr_0 (uint8 NHWC) + labels")
    p.set_defaults(run=_run_sample)


def _sample_labels(model, classes: list[int] | None, n: int | None) -> torch.Tensor:
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


def _run_sample(args) -> int:
    for flag in ("out", "npz"):
        if getattr(args, flag) is not None:
            check_writable(getattr(args, flag), f"--{flag}")
    model = load(args.ckpt)
    labels = _sample_labels(model, args.classes, args.n)
    engine = Sampler(model, device=args.device, backend=args.backend, precision=args.precision)
    w = torch.tensor(args.w).repeat_interleave(len(labels))  # one batch covers every panel
    start = time.perf_counter()
    x = engine.sample(labels.repeat(len(args.w)), w=w, steps=args.steps, sampler=args.sampler,
                      v=args.v, eta=args.eta, seed=args.seed, batch_size=args.batch,
                      progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    _write_outputs(args, model, x.cpu(), labels)
    print(f"{len(x)} samples, {args.steps} steps, {seconds:.2f} s, {len(x) / seconds:.1f} "
          f"samples/s, backend {engine.backend}, device {engine.device}, precision {engine.precision}"
          f" -> {args.out}")
    return 0


def _write_outputs(args, model, x: torch.Tensor, labels: torch.Tensor) -> None:
    names = getattr(model, "class_names", None) or [f"class {k}" for k in
                                                    range(model.num_classes)]
    chunks = x.split(len(labels))
    with atomic_paths(args.out, args.npz) as (png, npz):  # both appear, or neither
        if npz is not None:
            _write_npz(npz, x, labels.repeat(len(args.w)), np.asarray(args.w))
        save_panels(png, [(w, xs, labels) for w, xs in zip(args.w, chunks)], names)


def _write_npz(path: str, x: torch.Tensor, labels: torch.Tensor, w: np.ndarray) -> None:
    arr = to_uint8_images(x) if x.dim() == 4 else x.numpy()
    with open(path, "wb") as f:
        np.savez(f, arr_0=arr, labels=labels.numpy(), w=w)


_FLAG_TYPES = {"int": int, "float": float, "str": str}


def _add_config_flags(parser, config_class) -> None:
    """One `--flag-name` per dataclass field, default None (= the field's default, or on --resume
    the checkpoint's value)."""
    for field in dataclasses.fields(config_class):
        kind = _FLAG_TYPES[field.type.split(" | ")[0]]
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=kind,
                            default=None,
                            help=f"{field.metadata.get('help', '')} (default: {field.default})")


def _given(args, config_class) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
            if getattr(args, f.name) is not None}


def _add_train(sub) -> None:
    from cfgengine.train import TrainConfig

    p = sub.add_parser("train", help="train a class-conditional model (paper Algorithm 1)",
                       description="Flags default to TrainConfig's fields; with --resume, to the "
                                   "checkpoint's values.")
    _add_config_flags(p, TrainConfig)
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue this ckpt.pt exactly where it stopped")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from cfgengine import train

    given = _given(args, train.TrainConfig)
    progress = sys.stderr.isatty()
    if args.resume is not None:
        state = train.resume(args.resume, progress, **given)
    else:
        state = train.train(train.TrainConfig(**given), progress)
    print(f"trained to step {state.step}: checkpoint {Path(state.config.out) / 'ckpt.pt'}, "
          f"EMA weights {train.export_path(state.config)}")
    return 0


def _add_train_classifier(sub) -> None:
    from cfgengine.classifier import ClassifierTrainConfig

    p = sub.add_parser("train-classifier", help="train the classifier that judges a dataset's "
                       "samples (default output: cfgengine/assets/classifier-DATA.safetensors)")
    _add_config_flags(p, ClassifierTrainConfig)
    p.set_defaults(run=_run_train_classifier)


def _run_train_classifier(args) -> int:
    from cfgengine import classifier

    config = classifier.ClassifierTrainConfig(**_given(args, classifier.ClassifierTrainConfig))
    net, heldout = classifier.train_classifier(config, progress=sys.stderr.isatty())
    dataset = classifier.load_dataset(config.data, config.image_size)
    path = classifier.save_classifier(net, dataset, heldout,
                                      config.out or classifier.classifier_path(dataset.info.name))
    print(f"held-out accuracy {heldout:.4f} -> {path}")
    return 0


def _add_classifier_accuracy(sub) -> None:
    p = sub.add_parser("classifier-accuracy", help="class accuracy and diversity of a model's "
                       "samples per w, judged by the dataset's shipped classifier")
    p.add_argument("--ckpt", default="default", help="model file or built-in name (default: default)")
    p.add_argument("--w", type=_float_list, default=[0.0, 0.3, 1.0, 4.0],
                   help="guidance weights w of the paper, comma list (default: 0,0.3,1,4)")
    p.add_argument("--steps", type=int, default=256, help="sampling steps T (default: 256)")
    p.add_argument("--n", type=int, default=16, help="samples per class (default: 16)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_classifier_accuracy)


def _run_classifier_accuracy(args) -> int:
    from cfgengine import classifier

    model = load(args.ckpt)
    if not getattr(model, "dataset", None):
        raise UserError(f"{args.ckpt}: not a model trained by cfgengine on a known dataset")
    judge = classifier.load_classifier(model.dataset)
    rows = classifier.guidance_report(model, judge, args.w, steps=args.steps, per_class=args.n,
                                      seed=args.seed)
    print(f"{args.ckpt}: {args.n} samples/class x {model.num_classes} classes, T={args.steps}; "
          f"classifier held-out accuracy {judge.heldout_accuracy:.4f}")
    print("     w  accuracy  95% lower bound  diversity (vs real)")
    for row in rows:
        print(f"{row.w:6g}  {row.accuracy:8.4f}  {row.lower_bound:15.4f}  {row.diversity:9.3f}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX, AOTInductor (.pt2) or TensorRT "
                                      "(experimental)",
                       description="Export the guided denoiser (conditional and null rows as one "
                                   "doubled batch) for cfgengine.load / cfgengine sample --ckpt.")
    p.add_argument("model", help="model file (.pt, .safetensors) or built-in name (default)")
    p.add_argument("--format", required=True, choices=("onnx", "aoti", "tensorrt"),
                   help="onnx (ONNX Runtime), aoti (AOTInductor .pt2) or tensorrt (EXPERIMENTAL: "
                        "untested here, needs TensorRT and a CUDA GPU)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="weight precision; normalisations stay fp32 (default: fp32)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="largest batch B the artifact accepts (it computes 2B rows; default: 64)")
    p.add_argument("--device", default=None,
                   help="aoti: cpu or cuda (default cpu); tensorrt: the GPU (default cuda)")
    p.add_argument("-o", "--out", default=None,
                   help="output file (default: MODEL's name with the format's suffix)")
    p.set_defaults(run=_run_export)


def _export_path(args) -> Path:
    from cfgengine.export import FORMAT_OF_SUFFIX, SUFFIXES

    out = Path(args.out) if args.out else Path(Path(args.model).stem + SUFFIXES[args.format])
    if FORMAT_OF_SUFFIX.get(out.suffix) != args.format:
        raise UserError(f"-o: a {args.format} export must be named *{SUFFIXES[args.format]}, "
                        f"got {out}")
    check_writable(out, "-o")
    return out


def _run_export(args) -> int:
    from cfgengine import export

    out = _export_path(args)
    options = {"precision": args.precision, "max_batch": args.max_batch, "source": args.model}
    if args.device is not None:
        if args.format == "onnx":
            raise UserError("--device applies to aoti and tensorrt; an ONNX file picks its "
                            "device when loaded")
        options["device"] = args.device
    start = time.perf_counter()
    path = export.export(load(args.model), out, format=args.format, **options)
    print(f"exported {args.model} as {args.format} ({args.precision}, batch 1..{args.max_batch}) "
          f"in {time.perf_counter() - start:.1f} s -> {path}")
    return 0


def _list_of(convert, flag: str):
    """argparse type: a comma list of `convert` values, with a one-line error naming `flag`."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(convert(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise UserError(f"{flag} takes a comma list, got {text!r}") from None
        if not values:
            raise UserError(f"{flag} takes a non-empty comma list, got {text!r}")
        return values
    return parse


_BENCH_FLAGS = {  # flag: (SweepConfig field, argparse type)
    "--model": ("model", str), "--device": ("device", str),
    "--steps": ("steps", _list_of(int, "--steps")),
    "--batch": ("batches", _list_of(int, "--batch")),
    "--backends": ("backends", _list_of(str, "--backends")),
    "--precisions": ("precisions", _list_of(str, "--precisions")),
    "--baselines": ("baselines", _list_of(str, "--baselines")),
    "--exported": ("exported", _list_of(str, "--exported")), "--solver": ("solver", str),
    "--w": ("w", float), "--repeats": ("repeats", int), "--seed": ("seed", int),
    "--threads": ("threads", int),
}


def _add_bench(sub) -> None:
    from cfgengine.bench.harness import SWEEPS

    p = sub.add_parser("bench", help="end-to-end sampling benchmark against diffusers-style "
                       "baselines (JSON + markdown + PNG in --out-dir)")
    p.add_argument("--sweep", choices=tuple(SWEEPS), default="cpu",
                   help="preset sweep; the flags below override its fields (default: cpu)")
    p.add_argument("--quick", action="store_true", help="the quick sweep (< 2 min on 2 CPU cores)")
    for flag, (field, kind) in _BENCH_FLAGS.items():
        p.add_argument(flag, dest=field, type=kind, default=None, help="(default: the sweep's)")
    p.add_argument("--out-dir", default="bench/results", help="folder of the result files")
    p.add_argument("--name", default=None, help="file stem (default: e2e-SWEEP-DEVICE-DATE)")
    p.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    from cfgengine.bench import harness, report

    sweep = "quick" if args.quick else args.sweep
    config = harness.check_config(dataclasses.replace(harness.SWEEPS[sweep], **{
        field: getattr(args, field) for field, _ in _BENCH_FLAGS.values()
        if getattr(args, field) is not None}))
    result = harness.sweep(config, progress=sys.stderr.isatty())
    name = args.name or report.stem(result, sweep)
    command = harness.command_line(config, sweep)
    paths = report.write(result, args.out_dir, name, command)
    print(report.markdown(dict(result, command=command), paths["png"].name))
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


def _add_eval(sub) -> None:
    from cfgengine.evaluate import PAPER_W

    p = sub.add_parser("eval", help="FID / IS / precision / recall / accuracy of samples per "
                       "(model, T, w), in the dataset classifier's feature space")
    p.add_argument("--ckpt", action="append", required=True,
                   help="model file (repeat for several models, e.g. one per p_uncond)")
    p.add_argument("--w", type=_float_list, default=list(PAPER_W),
                   help="guidance weights w of the paper (diffusers' guidance_scale = 1 + w), "
                        "comma list; one sampling pass covers them all (default: %(default)s)")
    p.add_argument("--steps", type=lambda t: _ints(t, "--steps"), default=[64],
                   help="sampling steps T, comma list (default: 64)")
    p.add_argument("--n", type=int, default=1000, help="class-balanced samples per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="eval", help="results folder (its parent must exist)")
    p.add_argument("--features", default=None,
                   help="feature network: a classifier .safetensors, or a .pt2 / TorchScript "
                        "network such as Inception; no downloads (default: the dataset's "
                        "shipped classifier)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN precision/recall manifolds")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per interval")
    p.add_argument("--batch", type=int, default=2000, help="rows per sampling forward")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache "
                   "(default: ~/.cache/cfgengine)")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from cfgengine.evaluate import EvalConfig, run_eval

    config = EvalConfig(tuple(args.ckpt), tuple(args.w), tuple(args.steps), args.n, args.seed,
                        args.out_dir, args.features, args.k, args.bootstrap, args.batch,
                        cache_dir=args.cache_dir)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir: {out} is a file")
    if not out.resolve().parent.is_dir():
        raise UserError(f"--out-dir: parent folder of {out} does not exist")
    run_eval(config)  # models and features are checked before anything is written
    print(f"results -> {out / 'results.json'}, {out / 'results.md'}")
    return 0


# Each entry adds one subcommand (its flags and `run`).
COMMANDS: list = [_add_sample, _add_train, _add_train_classifier, _add_classifier_accuracy,
                  _add_export, _add_bench, _add_eval]


if __name__ == "__main__":
    sys.exit(main())
