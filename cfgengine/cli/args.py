"""Argument types shared by the subcommands: one comma-list parser, range-checked numbers, flags
made from config dataclasses, and the one-line user error (exit code 2)."""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Callable

DEFAULT_MODEL = "default"


class UserError(Exception):
    """An error the user caused (bad flag, bad file): reported in one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        raise UserError(message)


def comma_list(convert: Callable, flag: str, finite: bool = False) -> Callable[[str], list]:
    """argparse type: a non-empty comma list of `convert` values, errors naming `flag`."""
    def parse(text: str) -> list:
        try:
            values = [convert(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise UserError(f"{flag} takes a comma list of {convert.__name__} values, "
                            f"got {text!r}") from None
        if not values:
            raise UserError(f"{flag} takes a non-empty comma list, got {text!r}")
        if finite and not all(math.isfinite(v) for v in values):
            raise UserError(f"{flag} takes finite numbers, got {text!r}")
        return values
    return parse


def guidance_weights(flag: str = "--w") -> Callable[[str], list[float]]:
    """The paper's w as a number or a comma list of finite numbers."""
    return comma_list(float, flag, finite=True)


def add_model_flag(parser, help_text: str = "model file, diffusers folder, Hugging Face hub id "
                                            "(org/name) or built-in name") -> None:
    parser.add_argument("--ckpt", default=DEFAULT_MODEL,
                        help=f"{help_text} (default: {DEFAULT_MODEL})")
    add_trust_flag(parser)


def add_trust_flag(parser, what: str = "--ckpt") -> None:
    parser.add_argument("--trust-code", action="store_true",
                        help=f"run native code from a {what} .pt2 / TensorRT plan that `cfgengine "
                             "export` did not write on this machine (only for sources you trust)")


_FIELD_TYPES = {"int": int, "float": float, "str": str}


def field_type(field: dataclasses.Field, flag: str) -> Callable:
    """The argparse type of a config field: its scalar type, or a comma list for tuples."""
    kind = field.type.split(" | ")[0]
    if kind.startswith("tuple["):
        return lambda text: tuple(comma_list(_FIELD_TYPES[kind[6:].split(",")[0]], flag)(text))
    return _FIELD_TYPES[kind]


def add_config_flags(parser, config_class, aliases: dict[str, str] | None = None,
                     flags: dict[str, str] | None = None) -> None:
    """One flag per dataclass field (`--field-name`, or `flags[field]`), default None (= the
    field's default, or on --resume the checkpoint's value). `aliases` maps a field to an old
    spelling that is still accepted."""
    aliases, flags = aliases or {}, flags or {}
    for field in dataclasses.fields(config_class):
        flag = flags.get(field.name, "--" + field.name.replace("_", "-"))
        names = [flag] + ([aliases[field.name]] if field.name in aliases else [])
        parser.add_argument(*names, dest=field.name, type=field_type(field, flag), default=None,
                            help=f"{field.metadata.get('help', '')} (default: {field.default})")


def given(args, config_class) -> dict:
    """The config fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
            if getattr(args, f.name) is not None}
