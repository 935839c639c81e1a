"""Helper that tests/test_distributed.py starts under torchrun (not a test module): runs several
`cfgengine` command lines in one launch and one process group (joined once: re-joining in one
process can meet a peer's stale address in torchrun's store), so one start-up covers them all.

FAIL_RANK=r makes rank r fail as a real run can: FAIL_HOW=nan raises sampling's NaN error on
that rank only; FAIL_HOW=exit kills the process mid-sampling without a word (a crash).
RANK_ARGS={"r": [extra args of each command]} gives rank r other flags; PERTURB_RANK=r scales
one weight of the model `sample` loads on rank r; KEEP_GOING=1 runs every command even after one
fails (the exit code is the largest)."""
import json
import os
import sys

import torch

from cfgengine import cli, distributed, sampler
from cfgengine.cli import sample as sample_cli


def _inject_failure(how: str) -> None:
    def fail(self, x_hat):
        if how == "exit":
            os._exit(3)
        raise FloatingPointError("sampling produced NaN/inf on this rank (injected)")
    sampler.Sampler._check_finite = fail


def _perturb_model() -> None:
    load = sample_cli.load

    def perturbed(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0].add_(1e-3)
        return model
    sample_cli.load = perturbed


def main() -> int:
    rank = os.environ["RANK"]
    if os.environ.get("FAIL_RANK") == rank:
        _inject_failure(os.environ.get("FAIL_HOW", "nan"))
    if os.environ.get("PERTURB_RANK") == rank:
        _perturb_model()
    commands = json.loads(sys.argv[1])
    extra = json.loads(os.environ.get("RANK_ARGS", "{}")).get(rank, [[]] * len(commands))
    worst = 0
    distributed.init()
    try:
        for argv, more in zip(commands, extra):
            worst = max(worst, cli.main([*argv, *more]))
            if worst and not os.environ.get("KEEP_GOING"):
                break
    finally:
        distributed.close()
    return worst


if __name__ == "__main__":
    sys.exit(main())
