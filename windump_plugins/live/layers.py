"""Guest RAM readers stacked on a live connection to QEMU, and the choice among them: each path is
tried in a declared order, fastest first, and the first that opens serves every read.

The connection (QMP or the gdbstub) is the base; a reader over it is QEMU's shared memory, its
process memory, its streamed ELF dump or pipelined ``m`` packets. A reader that cannot work here
raises :class:`PathUnavailable` saying why; which reader serves, and why each faster one was passed
over, is data (:class:`~windump_plugins.source.Access`) and goes to the log.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from ..errors import SourceError
from ..pieces import PieceMap
from ..source import FileExtent

log = logging.getLogger(__name__)


class PathUnavailable(Exception):
    """Why a memory path cannot serve here (one line); the next path is tried."""


class RamReader(abc.ABC):
    """Guest RAM through one path: ``layout`` holds the RAM it serves, which its source checks
    every read against before :meth:`readinto` sees it."""

    #: The path's name, as ``Access.path`` and the options that force a path spell it.
    name: ClassVar[str]

    def __init__(self, layout: PieceMap) -> None:
        self.layout = layout

    @property
    def ram(self) -> np.ndarray:
        return self.layout.ram

    @abc.abstractmethod
    def readinto(self, address: int, view: memoryview) -> None:
        """Fill ``view`` with guest physical memory from ``address`` (a range inside :attr:`ram`)."""

    def file_extents(self, address: int, length: int) -> list[FileExtent] | None:
        """Where the range lies verbatim in open files, for readers over files (see MemorySource)."""
        return None

    def reading_done(self) -> None:
        """Every read has been made: a reader that holds QEMU busy lets it go here."""

    def close(self) -> None:
        """Release what the reader holds, and end what :meth:`reading_done` ends if that was never
        called (an error midway)."""


#: A memory path as a source declares it: its name and how to open its reader.
MemoryPath = tuple[str, Callable[[], RamReader]]


def open_first(paths: Sequence[MemoryPath], *, forced: str | None,
               description: str) -> tuple[RamReader, dict[str, str]]:
    """The reader of the first path in ``paths`` that opens (of ``forced`` alone, when given), and
    why each path before it was passed over, in order.

    Raises SourceError when the forced path, or the last one, cannot serve either.
    """
    names = [name for name, _ in paths]
    passed_over: dict[str, str] = {}
    if forced is not None:
        passed_over = {name: f"not tried: {forced} was asked for" for name in names[: names.index(forced)]}
        paths = [path for path in paths if path[0] == forced]
    for name, open_reader in paths:
        try:
            reader = open_reader()
        except PathUnavailable as why:
            passed_over[name] = str(why)
            log.info("%s: %s passed over: %s", description, name, why)
            continue
        log.info("%s: guest RAM through %s", description, name)
        return reader, passed_over
    name = paths[-1][0]
    raise SourceError(f"{description}: cannot read guest RAM through {name}: {passed_over[name]}")
