"""`cfgengine …` subcommands, one module each (`add(sub)` + `run(args)`). Validation happens at
the edge: a user error is one line on stderr and exit code 2 — never a traceback, never a
half-written output file."""
from __future__ import annotations

import argparse
import sys
import warnings

from cfgengine import distributed
from cfgengine.cli import (bench, classifier_accuracy, distill, eval, export, sample, serve,
                           train, train_classifier)
from cfgengine.cli.args import Parser, UserError

COMMANDS = (sample, train, distill, train_classifier, classifier_accuracy, export, bench, eval, serve)


DESCRIPTION = """\
Sample, train, score, export, benchmark and serve class-conditional diffusion models with
classifier-free guidance (Ho & Salimans 2022). The guidance weight w is the paper's: diffusers'
guidance_scale is 1 + w."""
EPILOG = """\
example:
  cfgengine sample --w 0,1,4 --steps 256 --out samples.png

`cfgengine COMMAND --help` lists a command's flags. A mistake in a flag or a file ends in one
line on stderr and exit status 2, with nothing half-written. Documentation: README.md and
docs/ in the source tree (samplers, models, performance, serving, distributed, runner, trust,
studies, design)."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cfgengine", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                title="commands", metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
    return parser


def quiet_library_warnings() -> None:
    """Deprecation and future warnings of torch, onnx and friends are not the user's concern:
    they would add stray stderr lines to a one-line error or a clean run. Ours still show."""
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"cfgengine(\.|$)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cfgengine` console script."""
    try:
        with warnings.catch_warnings():
            quiet_library_warnings()
            args = build_parser().parse_args(argv)
            return args.run(args) or 0
    except (UserError, ValueError, FloatingPointError, OSError) as err:
        if distributed.reports_errors():  # under torchrun: one rank speaks for all
            print(f"cfgengine: error: {err}", file=sys.stderr)  # one line: no traceback for these
        return 2
    except KeyboardInterrupt:
        print("cfgengine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
