"""Pulled pages: guest pages read from a source by address and appended to the dump file in its
layout's order, copied by the kernel when the source keeps them verbatim in a file, otherwise through
two small reused buffers, one filled while the other is written.

Memory use stays flat whatever the guest size. A source sees only reads (``readinto``,
``file_extents``); how soon the written bytes start for the disk is the caller's choice.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .errors import SourceError
from .formats.dumpheader import PAGE_SHIFT
from .source import FileExtent, MemorySource

#: ``progress(done, total)`` in bytes, header included.
ProgressCallback = Callable[[int, int], None]

#: Bytes per kernel copy (``copy_file_range``, ``sendfile``): large enough to amortise the calls.
CHUNK_SIZE = 32 << 20

#: Bytes per read into a reused buffer: small enough to stay in a core's L2 cache, so that writing it
#: out copies from cache rather than from RAM. Measured on a 4 GiB guest through process memory, 1 MiB
#: buffers took 3.0 s to disk and kept the guest paused 1.4 s; 32 MiB buffers 3.4 s and 1.8 s.
BUFFER_SIZE = 1 << 20

#: Bytes between two progress reports.
PROGRESS_INTERVAL = 64 << 20

#: Errors with which the kernel declines a zero-copy call for this pair of files (not an I/O failure).
_COPY_REFUSED = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


class Progress:
    """Counts a dump's bytes and reports them every :data:`PROGRESS_INTERVAL`, at the start and at the end."""

    def __init__(self, callback: ProgressCallback | None, total: int):
        self.callback = callback
        self.total = total
        self.done = 0
        self.reported = 0

    def advance(self, count: int) -> None:
        self.done += count
        self.report()

    def report(self, force: bool = False) -> None:
        if self.callback is not None and (force or self.done - self.reported >= PROGRESS_INTERVAL):
            self.reported = self.done
            self.callback(self.done, self.total)


class PageCopier:
    """Appends the pages of a source to an open dump file, remembering which copy method the kernel
    allows; with ``eager`` writeback each chunk starts for the disk as soon as it is written."""

    def __init__(self, fd: int, source: MemorySource, progress: Progress, *, eager: bool):
        self.fd = fd
        self.source = source
        self.progress = progress
        self.eager = eager
        self.position = 0
        self.buffers: list[memoryview] = []
        self.turn = 0
        self.behind = _WriteBehind(fd)
        self.copy_file_range = True
        self.sendfile = True

    def copy(self, pages: np.ndarray, offset: int) -> None:
        """Write the ``[BasePage, PageCount]`` ranges ``pages`` back to back from file ``offset``."""
        self.position = os.lseek(self.fd, offset, os.SEEK_SET)
        try:
            for base_page, page_count in pages.tolist():
                self._copy_range(base_page << PAGE_SHIFT, page_count << PAGE_SHIFT)
            self.behind.drain()
        finally:
            self.behind.close()

    def _copy_range(self, address: int, length: int) -> None:
        """Guest bytes as they are: copied by the kernel when the source has them in a file."""
        extents = self.source.file_extents(address, length)
        if extents is None:
            self._read_range(address, length)
            return
        if sum(extent.length for extent in extents) != length:
            raise SourceError(f"{self._name()}: file extents do not cover {address:#x}-{address + length:#x}")
        for extent in extents:
            self._copy_extent(extent)

    def _name(self) -> str:
        return self.source.description or "source"

    def _advance(self, count: int, *, written: bool = True) -> None:
        """Count ``count`` more bytes of the dump; ``written`` ones are on their way to disk now."""
        if written and self.eager:
            start_writeback(self.fd, self.position, count)
        self.position += count
        self.progress.advance(count)

    def _chunk_buffer(self) -> memoryview:
        """The next of two reused buffers, once the write-behind of its last contents is done."""
        if len(self.buffers) < 2:
            self.buffers.append(memoryview(bytearray(min(BUFFER_SIZE, self.progress.total))))
        self.turn = (self.turn + 1) % len(self.buffers)
        self.behind.wait_for(self.turn)
        return self.buffers[self.turn]

    def _write_all(self, data: memoryview) -> None:
        """Write now, in order: after whatever the write-behind still holds."""
        self.behind.drain()
        write_fully(self.fd, data)

    def _read_range(self, address: int, length: int) -> None:
        """Read a chunk while the previous one is being written: a live source's reads (and so the
        guest's pause) then take as long as the slower of reading and writing, not their sum."""
        end = address + length
        while address < end:
            buffer = self._chunk_buffer()
            view = buffer[: min(len(buffer), end - address)]
            self.source.readinto(address, view)
            self.behind.submit(self.turn, view, self.position if self.eager else None)
            address += len(view)
            self._advance(len(view), written=False)

    def _copy_extent(self, extent: FileExtent) -> None:
        src_fd = extent.file.fileno()
        offset, end = extent.offset, extent.offset + extent.length
        while offset < end:
            count = min(CHUNK_SIZE, end - offset)
            copied = self._kernel_copy(src_fd, offset, count)
            if copied is None:
                copied = self._pread_copy(src_fd, offset, count)
            if copied == 0:
                raise SourceError(f"{self._name()}: file ends at {offset:#x}, before the guest memory it should hold")
            offset += copied
            self._advance(copied)

    def _kernel_copy(self, src_fd: int, offset: int, count: int) -> int | None:
        """Bytes the kernel copied, or None once it has refused both calls for these files."""
        if self.copy_file_range:
            try:
                return os.copy_file_range(src_fd, self.fd, count, offset)
            except OSError as exc:
                if exc.errno not in _COPY_REFUSED:
                    raise
                self.copy_file_range = False
        if self.sendfile:
            try:
                return os.sendfile(self.fd, src_fd, offset, count)
            except OSError as exc:
                if exc.errno not in _COPY_REFUSED:
                    raise
                self.sendfile = False
        return None

    def _pread_copy(self, src_fd: int, offset: int, count: int) -> int:
        view = self._chunk_buffer()[:count]
        got = os.preadv(src_fd, [view], offset)
        self._write_all(view[:got])
        return got


def write_fully(fd: int, data: memoryview) -> None:
    """Write all of ``data`` at the file position."""
    while data:
        data = data[os.write(fd, data):]


def _write_behind(fd: int, data: memoryview, offset: int | None) -> None:
    write_fully(fd, data)
    if offset is not None:
        start_writeback(fd, offset, len(data))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing these dump bytes to disk now rather than at the final fsync (length 0: to the
    end of the file).

    POSIX_FADV_DONTNEED starts writeback of dirty pages without waiting for it (and lets the cache
    drop them once clean), so the disk works while later chunks are copied: measured here, a 1 GiB
    dump then takes 0.6 s instead of 0.95 s to reach the disk, and the dump does not crowd the page
    cache of a large guest's host.
    """
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class _WriteBehind:
    """Writes filled buffers to the dump on one worker thread, in submission order.

    Only file writes run on the worker, never source reads or progress callbacks, so sources need
    not be thread-safe. A write error surfaces on the next wait.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.executor: ThreadPoolExecutor | None = None
        self.pending: dict[int, Future] = {}

    def submit(self, slot: int, data: memoryview, offset: int | None) -> None:
        """Queue ``data``; with the ``offset`` of the dump it belongs at (where the file position will
        be), its writeback starts once it is written."""
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="windump-write")
        self.pending[slot] = self.executor.submit(_write_behind, self.fd, data, offset)

    def wait_for(self, slot: int) -> None:
        future = self.pending.pop(slot, None)
        if future is not None:
            future.result()

    def drain(self) -> None:
        for slot in list(self.pending):
            self.wait_for(slot)

    def close(self) -> None:
        """Wait for the worker (after an error too, so nothing writes once the file is gone)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
