"""The arguments both front ends take, declared once: those ``windump save`` and gdb's
``windump-save`` share, and a source :class:`~windump_plugins.location.Option` as a ``--NAME`` flag."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from ..location import Option


@dataclass(frozen=True)
class Argument:
    """One argparse argument: its flags or name, and the keywords of ``add_argument``."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser, **overrides: Any) -> None:
        parser.add_argument(*self.flags, **{**self.options, **overrides})


def arg(*flags: str, **options: Any) -> Argument:
    return Argument(flags, options)


FORCE = arg("-f", "--force", action="store_true", help="replace OUTPUT if it exists")
QUIET = arg("-q", "--quiet", action="store_true", help="no progress and no summary")
#: Counted: -v logs at info (which memory path ran, why, pauses, timings), -vv at debug too. The
#: default is suppressed so that a subcommand's -v adds to, not resets, the program's.
VERBOSE = arg("-v", "--verbose", action="count", default=argparse.SUPPRESS,
              help="say what happens: -v which memory path ran, why, pauses and timings; -vv debug too")


def option_argument(option: Option, *, default_note: str = "") -> Argument:
    """``--NAME`` (a flag) or ``--NAME METAVAR`` for ``option``, with the same help and checks as
    in a location; a flag's default is None so that a front end's setting can stand in for it."""
    help_text = option.described + (f" ({default_note})" if default_note else "")
    if option.is_flag:
        return arg(f"--{option.name}", dest=option.keyword, action="store_true", default=None, help=help_text)

    def convert(text: str) -> object:
        try:
            return option.convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    metavar = "|".join(option.choices) if option.choices else option.metavar
    return arg(f"--{option.name}", dest=option.keyword, metavar=metavar, type=convert,
               default=option.default_value(), help=help_text)
