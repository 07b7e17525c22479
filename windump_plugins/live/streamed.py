"""Guest RAM from QEMU's own ELF dump, with nothing on disk: the reads a dump makes before its body
are answered by small ``begin``/``length`` ELFs, cached by page; the body is read from one detached
dump streamed through a pipe, front to back."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ..formats.dumpheader import PAGE_SIZE
from .elfstream import ElfStream
from .hmp import RamRegion, ram_layout
from .layers import RamReader
from .qmpdump import GuestMemoryDumps

log = logging.getLogger(__name__)

#: The longest read answered by small ELFs before the stream starts. Reads before a dump's body
#: (KDBG, bug-check data, CONTEXTs, page tables) are far shorter; the body is read in pieces of up
#: to a MiB, so its first long read starts the stream.
SMALL_READ = 64 << 10

#: Stream bytes between two ``query-dump`` progress polls.
PROGRESS_INTERVAL = 256 << 20


class SmallElfPages:
    """Guest pages from small ``dump-guest-memory`` ELFs, in any order, each page fetched once and
    kept: the missing pages a read needs come in one ELF per stretch of consecutive pages."""

    def __init__(self, dumps: GuestMemoryDumps) -> None:
        self._dumps = dumps
        self._pages: dict[int, bytes] = {}

    def keep(self, address: int, data: bytes) -> None:
        """Keep ``data``, whole pages from the page-aligned ``address``."""
        for offset in range(0, len(data), PAGE_SIZE):
            self._pages[(address + offset) // PAGE_SIZE] = data[offset : offset + PAGE_SIZE]

    def holds(self, address: int, length: int) -> bool:
        """Whether every page of the range is kept already."""
        return all(page in self._pages for page in _pages_of(address, length))

    def readinto(self, address: int, view: memoryview) -> None:
        """Fill ``view`` from the kept pages, fetching the missing ones first."""
        pages = _pages_of(address, len(view))
        missing = [page for page in pages if page not in self._pages]
        for first, count in _stretches(missing):
            begin = first * PAGE_SIZE
            with self._dumps.small_elf(begin, count * PAGE_SIZE) as elf:
                self.keep(begin, elf.read(begin, count * PAGE_SIZE))
        done = 0
        for page in pages:
            inside = address + done - page * PAGE_SIZE
            length = min(len(view) - done, PAGE_SIZE - inside)
            view[done : done + length] = self._pages[page][inside : inside + length]
            done += length

    def read(self, address: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.readinto(address, memoryview(buffer))
        return bytes(buffer)


class StreamedRam(RamReader):
    """RAM from QEMU's streamed ELF: short reads from :class:`SmallElfPages` until the body's first
    long read starts the stream, then forward only (pages kept before are still answered).

    QEMU writes one dump at a time, so no small ELF can be had once the stream has started; the
    stream passes guest memory once, in physical order, as the dump's runs are read. ``progress``
    gets QEMU's ``(completed, total)`` every :data:`PROGRESS_INTERVAL` of stream and once at its end.
    """

    name = "stream"

    def __init__(self, dumps: GuestMemoryDumps, regions: Sequence[RamRegion], pages: SmallElfPages,
                 progress: Callable[[int, int], None] | None = None) -> None:
        super().__init__(ram_layout(regions))
        self._dumps = dumps
        self._pages = pages
        self._progress = progress
        self._stream: ElfStream | None = None
        self._next_poll = PROGRESS_INTERVAL

    def readinto(self, address: int, view: memoryview) -> None:
        if (self._stream is None and len(view) <= SMALL_READ) or self._pages.holds(address, len(view)):
            self._pages.readinto(address, view)
            return
        if self._stream is None:
            log.info("%s: QEMU's dump streams from here, the body's first read at %#x",
                     self._dumps.qmp.description, address)
            self._stream = self._dumps.start_stream()
        self._stream.readinto(address, view)
        if self._stream.position >= self._next_poll:
            self._next_poll = self._stream.position + PROGRESS_INTERVAL
            self._poll()

    def _poll(self) -> None:
        completed, total = self._dumps.progress()
        if self._progress is not None:
            self._progress(completed, total)

    def reading_done(self) -> None:
        """Read the rest of the stream, so QEMU ends its dump normally, and wait for that end."""
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        try:
            stream.drain()
        finally:
            stream.close()
            if not self._dumps.qmp.lost:
                self._dumps.wait_end()
        if not self._dumps.qmp.lost:
            self._poll()  # the end as QEMU reports it: a guest smaller than one interval gets a report too

    close = reading_done


def _pages_of(address: int, length: int) -> range:
    """The numbers of the pages that ``[address, address + length)`` touches."""
    if length <= 0:
        return range(0)
    return range(address // PAGE_SIZE, (address + length - 1) // PAGE_SIZE + 1)


def _stretches(pages: Sequence[int]) -> list[tuple[int, int]]:
    """``(first page, count)`` of each run of consecutive numbers in the sorted ``pages``."""
    stretches: list[tuple[int, int]] = []
    for page in pages:
        if stretches and stretches[-1][0] + stretches[-1][1] == page:
            stretches[-1] = (stretches[-1][0], stretches[-1][1] + 1)
        else:
            stretches.append((page, 1))
    return stretches
