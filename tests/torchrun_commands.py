"""Helper that tests/test_distributed.py starts under torchrun (not a test module): runs several
`cfgengine` command lines in one launch and one process group (joined once: re-joining in one
process can meet a peer's stale address in torchrun's store), so one start-up covers them all.

FAIL_RANK=r makes rank r fail as a real run can: FAIL_HOW=nan raises sampling's NaN error on
that rank only; FAIL_HOW=exit kills the process mid-sampling without a word (a crash)."""
import json
import os
import sys

from cfgengine import cli, distributed, sampler


def _inject_failure(how: str) -> None:
    def fail(self, x_hat):
        if how == "exit":
            os._exit(3)
        raise FloatingPointError("sampling produced NaN/inf on this rank (injected)")
    sampler.Sampler._check_finite = fail


def main() -> int:
    if os.environ.get("FAIL_RANK") == os.environ["RANK"]:
        _inject_failure(os.environ.get("FAIL_HOW", "nan"))
    distributed.init()
    try:
        for argv in json.loads(sys.argv[1]):
            code = cli.main(argv)
            if code:
                return code
    finally:
        distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
