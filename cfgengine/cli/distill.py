"""`cfgengine distill`: guidance distillation (Meng et al. 2023, stage one) of a trained model into
a student that runs one forward per guided step (flags are DistillConfig's fields)."""
from __future__ import annotations

import sys

from cfgengine.cli.args import add_config_flags, given


def add(sub) -> None:
    from cfgengine.distill import FLAGS, DistillConfig

    p = sub.add_parser("distill", help="distil a model's guided ε into a one-forward student",
                       description="Trains a student ε(z, λ, c, w) ≈ (1+w)·ε(z, c) − w·ε(z, ∅) "
                                   "initialised from the teacher. Flags default to DistillConfig's "
                                   "fields; with --resume, to the checkpoint's values.")
    add_config_flags(p, DistillConfig, flags=FLAGS)
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue this distillation checkpoint exactly where it stopped")
    p.set_defaults(run=run)


def run(args) -> int:
    from cfgengine import distill

    settings = given(args, distill.DistillConfig)
    progress = sys.stderr.isatty()
    if args.resume is not None:
        state = distill.resume(args.resume, progress, **settings)
    else:
        state = distill.distill(distill.DistillConfig(**settings), progress)
    print(f"distilled to step {state.step}: student {state.config.out}, checkpoint "
          f"{distill.checkpoint_path(state.config)}")
    return 0
