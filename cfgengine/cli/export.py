"""`cfgengine export`: the denoiser as ONNX, AOTInductor or TensorRT; loaded, it runs the doubled
guided batch or, where guidance is off, B rows."""
from __future__ import annotations

import time
from pathlib import Path

from cfgengine.atomic import check_distinct, check_writable
from cfgengine.cli.args import UserError
from cfgengine import trust
from cfgengine.registry import BUILTINS, load
from cfgengine.backends import check_device


def add(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX, AOTInductor (.pt2) or TensorRT "
                                      "(experimental)",
                       description="Export the denoiser for cfgengine.load / cfgengine sample "
                                   "--ckpt; the loaded file runs conditional and null rows as one "
                                   "doubled batch, and B rows where guidance is off. See "
                                   "docs/performance.md and, for .pt2 / TensorRT files, "
                                   "docs/trust.md.")
    p.add_argument("model", help="model file (.pt, .safetensors), built-in name (default) or "
                                 "diffusers pipeline folder")
    p.add_argument("--format", required=True, choices=("onnx", "aoti", "tensorrt"),
                   help="onnx (ONNX Runtime), aoti (AOTInductor .pt2) or tensorrt (EXPERIMENTAL: "
                        "not yet run on hardware; needs TensorRT and a CUDA GPU)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"), default="fp32",
                   help="weight precision; normalisations stay fp32; int8 (onnx): calibrated "
                        "on the model's own sampling trajectories (default: fp32)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="largest batch B the artifact accepts (it computes 2B rows; default: 64)")
    p.add_argument("--device", default=None,
                   help="aoti: cpu or cuda (default cpu); tensorrt: the GPU (default cuda)")
    p.add_argument("-o", "--out", default=None,
                   help="output file (default: MODEL's name with the format's suffix)")
    p.set_defaults(run=run)


def output_path(args) -> Path:
    from cfgengine.export import FORMAT_OF_SUFFIX, SUFFIXES

    out = Path(args.out) if args.out else Path(Path(args.model).stem + SUFFIXES[args.format])
    if FORMAT_OF_SUFFIX.get(out.suffix) != args.format:
        raise UserError(f"-o: a {args.format} export must be named *{SUFFIXES[args.format]}, "
                        f"got {out}")
    check_writable(out, "-o")
    check_distinct({"-o": out}, {"model": None if args.model in BUILTINS else args.model})
    return out


def run(args) -> int:
    from cfgengine import export

    out = output_path(args)
    if args.format != "onnx":  # code formats are recorded: a damaged trust file fails first
        trust.trusted_hashes()
    options = {"precision": args.precision, "max_batch": args.max_batch, "source": args.model}
    if args.device is not None:
        if args.format == "onnx":
            raise UserError("--device applies to aoti and tensorrt; an ONNX file picks its "
                            "device when loaded")
        check_device(args.device, None)  # cuda on a CPU-only torch: one line, before tracing
        options["device"] = args.device
    start = time.perf_counter()
    if args.precision == "int8":  # calibrated on the model's own sampling trajectories
        from cfgengine.sampler import sample

        options["sample"] = sample
    path = export.export(load(args.model), out, format=args.format, **options)
    if args.format == "tensorrt":
        trust.record(path)  # a plan is code: trust what this machine built (aoti records itself)
    print(f"exported {args.model} as {args.format} ({args.precision}, batch 1..{args.max_batch}) "
          f"in {time.perf_counter() - start:.1f} s -> {path}")
    return 0
