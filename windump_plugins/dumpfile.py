"""DumpFile: a full Windows crash dump (DumpType 1) read back as a memory source.

A full dump holds the pages of Run[0], Run[1], ... packed back to back after the header, so a
physical address maps to a file offset through the runs alone; windump uses this to inspect dumps
(``windump info``, ``windump verify``) and its tests use it to compare dumps.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import NamedTuple

import numpy as np

from .errors import FormatError, SourceError
from .filemap import FileMap, FileMapSource
from .formats.dumpheader import (
    DUMP_TYPE_BITMAP_FULL,
    DUMP_TYPE_FULL,
    PAGE_SHIFT,
    X64,
    HeaderFormat,
    body_size,
    header_runs,
    parse_header,
)


class DumpHeader(NamedTuple):
    """A dump file's header as found on disk, with the file's size."""

    format: HeaderFormat
    header: np.ndarray
    file_size: int


def open_dump(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path``; SourceError (one line) when it cannot be opened or is a
    directory (which ``open`` accepts and only the first read refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"cannot open {os.fspath(path)}: {exc.strerror}") from exc
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceError(f"cannot open {os.fspath(path)}: {os.strerror(errno.EISDIR)}")
    return fd


def read_dump_header(fd: int) -> DumpHeader:
    """Parse the dump header at the start of the open file ``fd`` (FormatError when it is none)."""
    fmt, header = parse_header(os.pread(fd, X64.size, 0))
    return DumpHeader(fmt, header, os.fstat(fd).st_size)


def unsupported_dump_type(dump_type: int) -> str | None:
    """Why windump cannot read a dump of this DumpType, or None when it can."""
    if dump_type == DUMP_TYPE_FULL:
        return None
    if dump_type == DUMP_TYPE_BITMAP_FULL:
        return "DumpType 5 (bitmap) is not supported yet"
    return f"DumpType {dump_type} is not supported (windump reads full dumps, DumpType 1)"


def run_segments(runs: np.ndarray, header_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each run's bytes are: ``(starts, ends, offsets)`` of physical byte ranges sorted by
    address and not overlapping, with the file offset of each range's first byte.

    The body packs runs in header order; the ranges are sorted here so lookups work even for a
    damaged header. Where runs overlap, the one with the lower BasePage serves the shared pages.
    """
    runs = np.asarray(runs, dtype=np.uint64).reshape(-1, 2)
    pages = runs[:, 1]
    first_page = np.concatenate(([0], np.cumsum(pages, dtype=np.uint64)[:-1])).astype(np.uint64)
    offsets = np.uint64(header_size) + (first_page << np.uint64(PAGE_SHIFT))
    order = np.argsort(runs[:, 0], kind="stable")
    starts = runs[order, 0] << np.uint64(PAGE_SHIFT)
    ends = starts + (pages[order] << np.uint64(PAGE_SHIFT))
    offsets = offsets[order]
    covered = np.maximum.accumulate(np.concatenate(([np.uint64(0)], ends)))[:-1].astype(np.uint64)
    clipped = np.maximum(starts, covered)
    keep = clipped < ends
    return clipped[keep], ends[keep], (offsets + (clipped - starts))[keep]


class DumpFile(FileMapSource):
    """The guest physical memory in a full dump written by windump or QEMU.

    ``format`` and ``header`` come from :func:`~windump_plugins.formats.dumpheader.parse_header`; ``runs`` is the
    header's ``(N, 2)`` ``[BasePage, PageCount]`` array. Raises FormatError for a file that is not a
    dump, is truncated, or has a DumpType this class does not read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.description = f"dump:{self.path}"
        self._fd = open_dump(self.path)
        self._file = os.fdopen(self._fd, "rb", buffering=0)
        try:
            self.format, self.header, self.file_size = read_dump_header(self._fd)
            reason = unsupported_dump_type(int(self.header["DumpType"]))
            if reason:
                raise FormatError(reason)
            self.runs = header_runs(self.header)
            expected = self.format.size + body_size(self.runs)
            if self.file_size < expected:
                raise FormatError(f"truncated dump, {self.file_size} bytes where header and runs need {expected}")
            starts, ends, offsets = run_segments(self.runs, self.format.size)
        except FormatError as exc:
            self._file.close()
            raise FormatError(f"{self.path}: {exc}") from None
        except BaseException:
            self._file.close()
            raise
        self.memory = FileMap(self._file, starts, ends, offsets, self.description, where="the dump")

    def close(self) -> None:
        self._file.close()
