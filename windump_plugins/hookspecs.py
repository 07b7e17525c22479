"""The windump plugin API: the hooks a plugin implements to give windump a new memory source.

A plugin is a module or object with functions marked ``@windump_plugins.hookimpl``, registered
through the ``windump`` entry-point group in its ``pyproject.toml``::

    [project.entry-points.windump]
    raw = "windump_raw.plugin"

The built-in sources (``elf``, ``sample``) are registered the very same way. windump asks the hooks
below in turn; a hook that raises is reported as the plugin's fault and never crashes windump.
"""

from __future__ import annotations

from dataclasses import dataclass

import pluggy

from .location import Option
from .source import MemorySource

PROJECT = "windump"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class SourceKind:
    """How a plugin's source is named on the command line, for help text and ``windump plugins``.

    ``pattern`` is what the user types (``"gdb://HOST:PORT"``, ``"FILE.elf"``); ``summary`` says
    in one line what it opens; ``options`` are the ``?NAME[=VALUE]`` options its location takes,
    which help, docs and gdb's ``windump-save`` are generated from.
    """

    pattern: str
    summary: str
    options: tuple[Option, ...] = ()


@hookspec(firstresult=True)
def windump_open_location(location: str) -> MemorySource | None:
    """Open ``location``, a ``SCHEME:REST`` string such as ``sample:`` or ``gdb://127.0.0.1:1234``.

    Return a :class:`~windump_plugins.source.MemorySource` when the scheme is yours, None otherwise;
    the first plugin that returns a source wins. Once you claim a location, report a failure to open
    it by raising :class:`~windump_plugins.errors.WindumpError` with a one-line message, not by
    returning None.
    """


@hookspec(firstresult=True)
def windump_open_file(path: str, head: bytes) -> MemorySource | None:
    """Open the regular file ``path`` if its content is a format you read.

    ``head`` holds the file's first bytes (up to 4096, fewer for a shorter file), so you can
    recognise a format by its magic without opening the file. Return None for content that is not
    yours; the first plugin that returns a source wins. Once you recognise the format, report damage
    by raising :class:`~windump_plugins.errors.WindumpError` (e.g. a truncated file).
    """


@hookspec
def windump_source_kinds() -> list[SourceKind]:
    """The sources this plugin opens, for ``windump save --help`` and ``windump plugins``.

    Every plugin is asked and all the lists are shown, in call order; return an empty list (or
    None) when you open nothing the user names. Called whenever help is shown, so do no I/O here.
    """
