"""Source locations, ``SCHEME:REST?OPTIONS``: the options a source declares once, the one parser of
their query strings, and the host and port of the network sources, so every source reads its
location alike and refuses the same mistakes with the same words."""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SourceError


@dataclass(frozen=True)
class Option:
    """One option of a source, declared once: ``?NAME`` (a flag) or ``?NAME=VALUE`` in its location.

    The name is the same wherever the option is given: the location's query string, gdb's
    ``windump-save --NAME`` and ``set windump NAME``; help and docs are generated from ``help``.
    ``type`` turns the text after ``=`` into the value the source takes, raising ValueError with a
    one-line reason when it cannot; an option with neither ``type`` nor ``choices`` is a flag (True
    when given, else False). ``choices`` are the only texts accepted. ``metavar`` stands for the
    value in usage lines. ``default`` is written as a user would type it and goes through ``type``
    too; None gives the source None (it decides). ``keyword`` is the source's keyword argument for
    the value (by default the name, ``-`` written ``_``).
    """

    name: str
    help: str
    type: Callable[[str], object] | None = None
    metavar: str = "VALUE"
    default: str | None = None
    choices: tuple[str, ...] = ()
    keyword: str = ""

    def __post_init__(self) -> None:
        if not self.keyword:
            object.__setattr__(self, "keyword", self.name.replace("-", "_"))

    @property
    def is_flag(self) -> bool:
        return self.type is None and not self.choices

    @property
    def usage(self) -> str:
        """How the option is written: ``packets``, ``timeout=S``, ``memory=shm|procmem|stream``."""
        if self.is_flag:
            return self.name
        return f"{self.name}={'|'.join(self.choices) if self.choices else self.metavar}"

    @property
    def described(self) -> str:
        """The help text with the default, as every front end shows it."""
        return self.help if self.default is None else f"{self.help} (default {self.default})"

    def convert(self, text: str) -> object:
        """The value of ``NAME=text``; ValueError with the one-line reason when ``text`` is none."""
        if self.choices and text not in self.choices:
            raise ValueError(f"{self.name}={text!r} is none of {', '.join(self.choices)}")
        if self.type is None:
            return text
        try:
            return self.type(text)
        except ValueError as error:
            raise ValueError(f"bad option value {self.name}={text!r}: {error}") from None

    def default_value(self) -> object:
        if self.is_flag:
            return False
        return None if self.default is None else self.convert(self.default)


def known_options(options: Sequence[Option]) -> str:
    """``the options are a, b=N`` for messages: what a user may write instead."""
    if not options:
        return "it takes no options"
    return "the options are " + ", ".join(option.usage for option in options)


def parse_options(location: str, query: str, options: Sequence[Option]) -> dict[str, Any]:
    """The values the ``&``-separated, percent-encoded ``query`` gives the declared ``options``, by
    keyword, every option included (those not given at their default); SourceError
    ``LOCATION: ...`` for an option not declared, given twice, or with a bad value."""
    declared = {option.name: option for option in options}
    given: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        name, equals, text = (urllib.parse.unquote(part) for part in item.partition("="))
        option = declared.get(name)
        if option is None:
            raise SourceError(f"{location}: unknown option {name!r}; {known_options(options)}")
        if name in given:
            raise SourceError(f"{location}: option {name!r} is given twice")
        if option.is_flag and equals:
            raise SourceError(f"{location}: option {name!r} takes no value: write ?{name}")
        if not option.is_flag and not equals:
            raise SourceError(f"{location}: option {name!r} needs a value: {option.usage}")
        try:
            given[name] = True if option.is_flag else option.convert(text)
        except ValueError as error:
            raise SourceError(f"{location}: {error}") from None
    return {option.keyword: given[option.name] if option.name in given else option.default_value()
            for option in options}


def host_and_port(location: str, parts: urllib.parse.SplitResult, usage: str) -> tuple[str, int]:
    """The host and port of ``parts`` (from ``urlsplit(location)``); SourceError ``LOCATION: usage``
    when either is missing or the location has a path."""
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number, or out of range
        host = port = None
    if not host or port is None or parts.path not in ("", "/"):
        raise SourceError(f"{location}: {usage}")
    return host, port


# -- value types: each says in its ValueError what it expects ------------------------------------

def integer(text: str) -> int:
    """A whole number, decimal or ``0x`` hexadecimal."""
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError("expected a whole number such as 4 or 0x1e") from None


def address(text: str) -> int:
    """A physical address, usually ``0x`` hexadecimal."""
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError("expected a physical address such as 0x7fe000")
    return value


def seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError("expected a number of seconds above 0, such as 2.5")
    return value
