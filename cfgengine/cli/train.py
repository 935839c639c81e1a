"""`cfgengine train`: the paper's Algorithm 1 (flags are TrainConfig's fields)."""
from __future__ import annotations

import sys
from pathlib import Path

from cfgengine import distributed
from cfgengine.cli.args import add_config_flags, given

# old spellings a user may have typed, still accepted
ALIASES = {"ema_weights": "--export"}


def add(sub) -> None:
    from cfgengine.train import TrainConfig

    p = sub.add_parser("train", help="train a class-conditional model (paper Algorithm 1)",
                       description="Train a class-conditional model with the paper's Algorithm 1: labels "
                                   "dropped to the null label with probability --p-uncond, EMA "
                                   "weights, resumable checkpoints. With --resume, flags default "
                                   "to the checkpoint's values. See docs/models.md.")
    add_config_flags(p, TrainConfig, aliases=ALIASES)
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue this ckpt.pt exactly where it stopped")
    p.set_defaults(run=run)


@distributed.command  # under torchrun: DDP, rank 0 writes
def run(args) -> int:
    from cfgengine import train

    settings = given(args, train.TrainConfig)
    progress = sys.stderr.isatty() and distributed.is_main()
    if args.resume is not None:
        state = train.resume(args.resume, progress, **settings)
    else:
        state = train.train(train.TrainConfig(**settings), progress)
    if distributed.is_main():
        print(f"trained to step {state.step}: checkpoint {Path(state.config.out) / 'ckpt.pt'}, "
              f"EMA weights {train.ema_weights_path(state.config)}")
    return 0
