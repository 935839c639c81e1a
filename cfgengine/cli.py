"""`cfgengine …` subcommands. Validation happens here, at the edge: a user error is one line on
stderr and exit code 2 — never a traceback, never a half-written output file."""
from __future__ import annotations

import argparse
import sys


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
    except (UserError, ValueError, FileNotFoundError) as err:
        print(f"cfgengine: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cfgengine: interrupted", file=sys.stderr)
        return 130


# Each entry adds one subcommand (its flags and `run`); defined below, one block per command.
COMMANDS: list = []


if __name__ == "__main__":
    sys.exit(main())
