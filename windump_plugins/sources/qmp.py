"""The ``qmp:`` source: a live QEMU guest on this host, read through its QMP monitor and paused only
while its RAM is read.

Opening the source stops a running VM (``query-status``, ``stop``); :meth:`QmpSource.reading_done`
or :meth:`QmpSource.close` (on errors and Ctrl-C too) resumes it with ``cont``, and only if it was
running. The guest's VMCOREINFO note and every vCPU's registers come from a one-page
``dump-guest-memory`` ELF that QEMU writes into a memfd passed with ``getfd``.

Guest RAM is read by the first of these readers (:mod:`windump_plugins.live`) that opens
(``?memory=`` forces one); :meth:`QmpSource.access` reports which, and why each faster one was
passed over:

1. ``shm``: RAM backends ``memory-backend-file`` with ``share=on`` (found with ``qom-list`` and
   ``qom-get`` under /objects) are mapped read-only from their ``mem-path``; ``info mtree -f`` says
   which backend offset each guest-physical range is. Other RAM blocks go through path 2.
2. ``procmem``: QEMU's process memory (PID from SO_PEERCRED) at the host addresses ``gpa2hva``
   names, copied with ``process_vm_readv`` (``/proc/PID/mem`` where that call is denied); the same
   same-host path as ``gdb://``'s.
3. ``stream``: QEMU's own ELF dump (``paging=false``, ``format=elf``, detached) read front to back
   from a pipe passed with ``getfd``; PT_LOADs come in physical order, as the dump's runs are read,
   so nothing touches the disk. Reads the dump makes *before* its body (KDBG, bug-check data, page
   tables, CONTEXTs, in any order and across pages) are answered by small ``begin``/``length``
   ELFs of the pages they need, cached; the stream starts with the body's first long read.
   ``query-dump`` reports QEMU's progress.

Paths 1 and 2 are trusted once the first page they read agrees with QEMU's own dump of it.

``qmp://HOST:PORT`` (TCP) works for a QEMU on this host (found through ``/proc/net/tcp``): file
descriptors cannot cross TCP, so QEMU writes the note ELF and the stream into a FIFO in a private
directory (``file:`` protocol) instead, and paths 1 and 2 work as over a unix socket. For a QEMU on
another host nothing works: its files, memory and FIFOs live on its host and QMP carries no bulk
data, so the source refuses it (run windump on QEMU's host).
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import SourceError
from ..formats.dumpheader import PAGE_SIZE
from ..hookspecs import SourceKind, hookimpl
from ..live.hmp import RamRegion, parse_ram_map
from ..live.layers import MemoryPath, RamReader, open_first
from ..live.qmp import QmpConnection
from ..live.qmpdump import GuestMemoryDumps
from ..live.samehost import open_process_ram, same_host_ram
from ..live.shm import open_shared_memory
from ..live.streamed import SmallElfPages, StreamedRam
from ..location import Option, host_and_port, parse_options, seconds
from ..source import Access, CpuState, FileExtent, MemorySource

SCHEME = "qmp"

#: How guest RAM may be read, fastest first (module docstring).
MEMORY_PATHS = ("shm", "procmem", "stream")

#: The ``?`` options of a ``qmp`` location.
OPTIONS = (
    Option("memory", "read RAM this way only, instead of the first way that works in this order",
           choices=MEMORY_PATHS),
    Option("timeout", "seconds to wait for each QMP reply", type=seconds, metavar="S", default="10"),
)

NO_DEVICE_MESSAGE = (
    "QEMU has no vmcoreinfo device, so the guest cannot publish its dump header: add `-device vmcoreinfo` "
    "to the QEMU command line and run the fwcfg driver in the guest"
)
NO_NOTE_MESSAGE = (
    "the guest published no VMCOREINFO note: is the fwcfg driver (virtio-win fwcfg64) installed and "
    "running in the guest? QEMU has the vmcoreinfo device"
)

def parse_location(location: str) -> dict | None:
    """Keyword arguments of :class:`QmpSource` for ``qmp:PATH`` or ``qmp://HOST:PORT`` (each with
    :data:`OPTIONS` after ``?``); None for other schemes."""
    parts = urllib.parse.urlsplit(location)
    if parts.scheme != SCHEME:
        return None
    usage = "expected qmp:PATH (unix socket) or qmp://HOST:PORT"
    address: str | tuple[str, int]
    if parts.netloc:
        address = host_and_port(location, parts, usage)
    elif parts.path:
        address = parts.path
    else:
        raise SourceError(f"{location}: {usage}")
    return {"address": address, **parse_options(location, parts.query, OPTIONS)}


class QmpSource(MemorySource):
    """Guest physical memory, VMCOREINFO note and vCPU registers of a QEMU reached through QMP.

    The connection (:class:`~windump_plugins.live.qmp.QmpConnection`) is the base; guest RAM is
    read by the first reader of :data:`MEMORY_PATHS` that opens over it (``memory`` forces one).
    :meth:`access` says which, why each faster one was passed over, and how long the guest was
    paused; ``progress`` gets QEMU's ``(completed, total)`` while a dump streams.
    """

    resumes_after_reading = True

    def __init__(self, address: str | tuple[str, int], *, memory: str | None = None, timeout: float = 10.0,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.address = address
        self.description = f"qmp:{address}" if isinstance(address, str) else f"qmp://{address[0]}:{address[1]}"
        self._stack = contextlib.ExitStack()
        try:
            self.qmp = QmpConnection(address, timeout=timeout, description=self.description)
            self._stack.callback(self.qmp.close)
            self._dumps = GuestMemoryDumps(self.qmp)
            self._stack.callback(self._dumps.close)
            self._dumps.refuse_active()
            self.qmp.pause()
            self._stack.callback(self.qmp.resume)
            regions = parse_ram_map(self.qmp.hmp("info mtree -f"))
            if not regions:
                raise SourceError(f"{self.description}: the guest has no RAM in \"info mtree -f\"")
            self._pages = SmallElfPages(self._dumps)
            first = regions[0].start
            with self._dumps.small_elf(first, PAGE_SIZE) as note_elf:
                self._cpus = note_elf.cpus()
                self._vmcoreinfo = note_elf.vmcoreinfo()
                self._pages.keep(first, note_elf.read(first, PAGE_SIZE))
            if self._vmcoreinfo is None:
                raise SourceError(f"{self.description}: {self._missing_note()}")
            self._reader, self._passed_over = open_first(self._paths(regions, progress), forced=memory,
                                                         description=self.description)
            self._stack.callback(self._reader.close)  # first on close: a stream ends before the guest resumes
        except BaseException:
            self._stack.close()
            raise

    def _paths(self, regions: list[RamRegion], progress: Callable[[int, int], None] | None) -> list[MemoryPath]:
        """:data:`MEMORY_PATHS` and their readers, fastest first (the module docstring)."""
        qmp, description, pages = self.qmp, self.description, self._pages

        def process_ram(some: list[RamRegion]) -> RamReader:
            return open_process_ram(qmp.pid, some, qmp.hmp, description=description, on_quit=qmp.mark_lost)

        return [
            ("shm", lambda: open_shared_memory(qmp, regions, rest=process_ram, trusted=pages.read,
                                               whose="QEMU's own dump of it")),
            ("procmem", lambda: same_host_ram(qmp.pid, regions, qmp.hmp, trusted=pages.read,
                                              whose="QEMU's own dump of it", description=description,
                                              on_quit=qmp.mark_lost)),
            ("stream", lambda: StreamedRam(self._dumps, regions, pages, progress)),
        ]

    def _missing_note(self) -> str:
        """Why there is no note: no vmcoreinfo device among -device's children, or a silent guest."""
        for container in ("/machine/peripheral", "/machine/peripheral-anon"):
            if any(child["type"] == "child<vmcoreinfo>" for child in self.qmp.execute("qom-list", path=container)):
                return NO_NOTE_MESSAGE
        return NO_DEVICE_MESSAGE

    @property
    def ram(self) -> np.ndarray:
        return self._reader.ram

    def readinto(self, address: int, buffer: memoryview) -> None:
        view = memoryview(buffer).cast("B")
        self.check_range(address, len(view))
        self._reader.readinto(address, view)

    def file_extents(self, address: int, length: int) -> list[FileExtent] | None:
        """Where a range lies in shared RAM backend files, so the writer copies it in the kernel."""
        self.check_range(address, length)
        return self._reader.file_extents(address, length)

    def vmcoreinfo(self) -> bytes | None:
        return self._vmcoreinfo

    def cpus(self) -> list[CpuState]:
        return self._cpus

    def access(self) -> Access:
        return Access(self._reader.name, dict(self._passed_over), self.qmp.paused_seconds)

    def reading_done(self) -> None:
        """End the stream (if any) and resume the guest if windump paused it."""
        try:
            self._reader.reading_done()
        finally:
            self.qmp.resume()

    def close(self) -> None:
        """Resume a guest windump paused (reads abandoned midway included), then disconnect."""
        self._stack.close()

    # What the tests and benchmarks look at; front ends read :meth:`access`.

    def execute(self, command: str, **arguments: object) -> Any:
        """Run a QMP command on the source's connection (see :meth:`QmpConnection.execute`)."""
        return self.qmp.execute(command, **arguments)

    @property
    def qemu_pid(self) -> int:
        return self.qmp.pid


@hookimpl
def windump_open_location(location: str) -> MemorySource | None:
    arguments = parse_location(location)
    if arguments is None:
        return None
    return QmpSource(**arguments)


@hookimpl
def windump_source_kinds() -> list[SourceKind]:
    return [SourceKind(
        "qmp:PATH or qmp://HOST:PORT[?OPTIONS]",
        "a live QEMU on this host through QMP (-qmp unix:PATH,server=on,wait=off); pauses a running VM "
        "only while its RAM is read",
        OPTIONS,
    )]
