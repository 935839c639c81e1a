"""`cfgengine bench`: the end-to-end sweep against diffusers-style baselines. Its flags are the
harness's own table (`cfgengine.bench.harness.FLAGS`), typed from SweepConfig's fields."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from cfgengine.cli.args import UserError, field_type

# old spellings a user may have typed, still accepted
ALIASES = {"sampler": "--solver", "precisions": "--precision"}
FIELD_HELP = {"model": "model file or built-in name", "device": "cpu, cuda, cuda:1 …",
              "steps": "sampling steps T, comma list", "batches": "batch sizes B, comma list",
              "backends": "engine backends, comma list", "precisions": "network precisions, comma list",
              "baselines": "baselines to time, comma list",
              "peers": "other runtimes on the engine's loop (openvino), comma list; "
                       "only with --processes",
              "exported": "exported formats to time, comma list",
              "sampler": "the sampling algorithm", "w": "guidance weight w of the paper",
              "repeats": "interleaved rounds per cell", "seed": "noise seed",
              "threads": "CPU threads for torch and ONNX Runtime",
              "processes": "processes per runner, each runner in its own (0: all in one)"}


def add(sub) -> None:
    from cfgengine.bench.harness import FLAGS, SWEEPS, SweepConfig

    p = sub.add_parser("bench", help="end-to-end sampling benchmark against diffusers-style "
                       "baselines (JSON + markdown + PNG in --out-dir)",
                       description="Time end-to-end sampling of the engine against three peers "
                                   "run on the same model, device and precision (two forwards "
                                   "per step; the diffusers pipeline loop; the same with a "
                                   "compiled network), in interleaved rounds — or, with "
                                   "--processes N (the cpu sweep), each runner in N processes of "
                                   "its own, alternating. A preset --sweep picks the cells; the flags below override its fields. See "
                                   "docs/performance.md.")
    p.add_argument("--sweep", choices=tuple(SWEEPS), default="cpu",
                   help="preset sweep; the flags below override its fields (default: cpu)")
    p.add_argument("--quick", action="store_true", help="the quick sweep (< 2 min on 2 CPU cores)")
    for field in dataclasses.fields(SweepConfig):
        flag = FLAGS[field.name]
        names = [flag] + ([ALIASES[field.name]] if field.name in ALIASES else [])
        p.add_argument(*names, dest=field.name, type=field_type(field, flag), default=None,
                       help=f"{FIELD_HELP.get(field.name, field.name)} (default: the sweep's)")
    p.add_argument("--out-dir", default="bench/results", help="folder of the result files")
    p.add_argument("--name", default=None, help="file stem (default: e2e-SWEEP-DEVICE-DATE)")
    p.set_defaults(run=run)


def check_flags(args) -> None:
    """--threads within the CPUs this process may use (100000 OpenMP threads segfault);
    --name a plain file stem, so every result stays inside --out-dir."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.threads is not None and not 1 <= args.threads <= cpus:
        raise UserError(f"--threads must be in [1, {cpus}] (the CPUs available), got "
                        f"{args.threads}")
    name = args.name
    if name is not None and (not name or name != Path(name).name or name.startswith(".")):
        raise UserError(f"--name must be a plain file stem (no folders, not hidden), got {name!r}")


def run(args) -> int:
    from cfgengine.bench import harness, isolated, report

    check_flags(args)
    sweep = "quick" if args.quick else args.sweep
    config = harness.check_config(dataclasses.replace(harness.SWEEPS[sweep], **{
        field: getattr(args, field) for field in harness.FLAGS
        if getattr(args, field) is not None}))
    measure = isolated.sweep if config.processes else harness.sweep
    result = measure(config, progress=sys.stderr.isatty())
    name = args.name or report.stem(result, sweep)
    command = harness.command_line(config, sweep)
    paths = report.write(result, args.out_dir, name, command)
    print(report.markdown(dict(result, command=command), paths["png"].name))
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0
