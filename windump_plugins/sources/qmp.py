"""The ``qmp:`` source: a live QEMU guest on this host, read through its QMP monitor and paused only
while its RAM is read.

Opening the source stops a running VM (``query-status``, ``stop``); :meth:`QmpSource.reading_done`
or :meth:`QmpSource.close` (on errors and Ctrl-C too) resumes it with ``cont``, and only if it was
running. The guest's VMCOREINFO note and every vCPU's registers come from a one-page
``dump-guest-memory`` ELF that QEMU writes into a memfd passed with ``getfd``.

Guest RAM is read by the first of these that works (``?memory=`` forces one):

1. ``shm``: RAM backends ``memory-backend-file`` with ``share=on`` (found with ``qom-list`` and
   ``qom-get`` under /objects) are mapped read-only from their ``mem-path``; ``info mtree -f`` says
   which backend offset each guest-physical range is. Other RAM blocks go through path 2.
2. ``procmem``: QEMU's process memory (PID from SO_PEERCRED) at the host addresses ``gpa2hva``
   names, copied with ``process_vm_readv`` (``/proc/PID/mem`` where that call is denied).
3. ``stream``: QEMU's own ELF dump (``paging=false``, ``format=elf``, detached) read front to back
   from a pipe passed with ``getfd``; PT_LOADs come in physical order, as the dump's runs are read,
   so nothing touches the disk. Reads the dump needs *before* its body (KDBG, bug-check data, page
   tables: any read of at most one page while the stream has not started) are answered by one-page
   ``begin``/``length`` ELFs, and cached; ``query-dump`` reports QEMU's progress.

``qmp://HOST:PORT`` (TCP) works for a QEMU on this host (found through ``/proc/net/tcp``): file
descriptors cannot cross TCP, so QEMU writes the note ELF and the stream into a FIFO in a private
directory (``file:`` protocol) instead, and paths 1 and 2 work as over a unix socket. For a QEMU on
another host nothing works: its files, memory and FIFOs live on its host and QMP carries no bulk
data, so the source refuses it (run windump on QEMU's host).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import mmap
import os
import shutil
import socket
import struct
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np
from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from ..errors import SourceError
from ..formats.dumpheader import PAGE_SIZE
from ..hookspecs import SourceKind, hookimpl
from ..location import Option, host_and_port, parse_options, seconds
from ..live.elfstream import ElfStream
from ..live.hmp import parse_host_address, parse_ram_map, ram_layout
from ..live.procmem import ProcessMemory, peer_pid
from ..source import Access, CpuState, FileExtent, MemorySource
from ..elffile import ElfSource

SCHEME = "qmp"

#: How guest RAM may be read, fastest first (module docstring).
MEMORY_PATHS = ("shm", "procmem", "stream")

#: The ``?`` options of a ``qmp`` location.
OPTIONS = (
    Option("memory", "read RAM this way only, instead of the first way that works in this order",
           choices=MEMORY_PATHS),
    Option("timeout", "seconds to wait for each QMP reply", type=seconds, metavar="S", default="10"),
)

#: Bytes of QEMU's greeting we wait for before handing the socket to the QMP client.
GREETING_PREFIX = b'{"QMP"'

#: Pipe capacity asked for (the unprivileged maximum by default): fewer wake-ups while streaming.
PIPE_SIZE = 1 << 20

#: Stream bytes between two ``query-dump`` progress polls.
PROGRESS_INTERVAL = 256 << 20

#: Seconds to wait for QEMU to finish a dump once its stream was read or abandoned.
DUMP_END_TIMEOUT = 60.0

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

    ``memory_path`` says how RAM is read (``shm``, ``procmem`` or ``stream``) and ``path_problems``
    why each faster path was passed over. ``paused_seconds`` is how long windump kept the guest
    paused (0 when it found the VM paused); ``qemu_progress`` the last ``query-dump``
    ``(completed, total)`` of a streamed dump.
    """

    resumes_after_reading = True

    def __init__(self, address: str | tuple[str, int], *, memory: str | None = None, timeout: float = 10.0,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.address = address
        self.description = f"qmp:{address}" if isinstance(address, str) else f"qmp://{address[0]}:{address[1]}"
        self.timeout = timeout
        self.progress = progress
        self.memory_path: str | None = None
        self.path_problems: dict[str, str] = {}
        self.qemu_pid: int | None = None
        self.was_running = False
        self.qemu_progress: tuple[int, int] | None = None
        self._paused_at: float | None = None
        self._paused_for = 0.0
        self._fd_names = itertools.count()
        self._fifo_dir: str | None = None
        self._stream: ElfStream | None = None
        self._readers: list[Callable[[int, memoryview], None]] | None = None
        #: Per region of ``_layout``: (open backend file, offset of the region in it), or None.
        self._files: list[tuple[BinaryIO, int] | None] = []
        self._pages: dict[int, bytes] = {}
        self._qmp: QEMUMonitorProtocol | None = None
        #: Set once the QMP connection is lost: cleanup then has no QEMU to talk to (and must not
        #: replace the error that told of the loss with one of its own).
        self._lost = False
        self._stack = contextlib.ExitStack()
        try:
            self._connect()
            self._stack.callback(self._disconnect)
            self._refuse_active_dump()
            self._pause()
            self._stack.callback(self._finish_reading)
            self._regions = parse_ram_map(self._hmp("info mtree -f"))
            if not self._regions:
                raise SourceError(f"{self.description}: the guest has no RAM in \"info mtree -f\"")
            with self._small_elf(self._regions[0].start, PAGE_SIZE) as note_elf:
                self._cpus = note_elf.cpus()
                self._vmcoreinfo = note_elf.vmcoreinfo()
                self._probe = (self._regions[0].start, note_elf.read(self._regions[0].start, PAGE_SIZE))
            if self._vmcoreinfo is None:
                raise SourceError(f"{self.description}: {self._missing_note()}")
            self._open_memory(memory)
        except BaseException:
            self._stack.close()
            raise

    # -- QMP -----------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Connect, make sure the peer greets as QMP, and find QEMU's PID when it runs on this host."""
        unix = isinstance(self.address, str)
        sock = socket.socket(socket.AF_UNIX if unix else socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        where = self.address if unix else f"{self.address[0]}:{self.address[1]}"
        try:
            if unix:
                sock.connect(self.address)
            else:
                sock.close()
                sock = socket.create_connection(self.address, self.timeout)
            greeting = b""
            while not greeting.startswith(GREETING_PREFIX) and len(greeting) < len(GREETING_PREFIX):
                greeting = sock.recv(len(GREETING_PREFIX), socket.MSG_PEEK)
                if not greeting:
                    break
        except FileNotFoundError:
            sock.close()
            raise SourceError(f"{self.description}: no socket at {where} (is QEMU running with "
                              f"-qmp unix:{where},server=on,wait=off?)") from None
        except TimeoutError:
            sock.close()
            raise SourceError(f"{self.description}: {where} sent no QMP greeting within {self.timeout:g} s: "
                              f"not a QEMU QMP monitor") from None
        except OSError as error:
            sock.close()
            raise SourceError(f"{self.description}: cannot connect to {where}: {error.strerror or error}") from None
        if not greeting.startswith(GREETING_PREFIX):
            sock.close()
            raise SourceError(f"{self.description}: {where} is not a QEMU QMP monitor (it greets with {greeting!r})")
        if unix:
            self.qemu_pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                struct.calcsize("3i")))[0]
        else:
            self.qemu_pid = peer_pid(sock)
            if self.qemu_pid is None:
                sock.close()
                raise SourceError(f"{self.description}: QEMU is not a process on this host (or not one we may "
                                  f"see); windump reads guest RAM only from a local QEMU: run it on QEMU's host")
        sock.settimeout(None)
        self._socket = sock
        self._qmp = QEMUMonitorProtocol(sock)
        try:
            self._qmp.connect()
        except QMPError as error:
            self._qmp = None
            sock.close()
            raise SourceError(f"{self.description}: QMP negotiation with {where} failed: {error}") from None
        self._qmp.settimeout(self.timeout)

    def _disconnect(self) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError, RuntimeError):
            self._qmp.close()
        self._socket.close()

    def execute(self, command: str, **arguments: object) -> object:
        """Run a QMP command; QEMU's refusal or a lost connection becomes one SourceError line."""
        try:
            return self._qmp.cmd(command, **arguments)
        except ExecuteError as error:
            raise SourceError(f"{self.description}: QMP {command} failed: {error.error.error.desc}") from None
        except (asyncio.TimeoutError, TimeoutError):
            raise SourceError(f"{self.description}: QEMU gave no answer to {command} within {self.timeout:g} s") from None
        except (QMPError, OSError, EOFError) as error:
            self._lost = True
            raise SourceError(f"{self.description}: lost the QMP connection during {command} (did QEMU quit?): "
                              f"{error or type(error).__name__}") from None

    def _query(self, command: str, *members: str) -> dict:
        """QMP ``command``'s reply, checked to be an object holding ``members``."""
        reply = self.execute(command)
        missing = [member for member in members if not isinstance(reply, dict) or member not in reply]
        if missing:
            raise SourceError(f"{self.description}: QMP {command} answered {str(reply)[:60]}, without {missing[0]!r}")
        return reply

    def _hmp(self, command_line: str) -> str:
        text = self.execute("human-monitor-command", **{"command-line": command_line})
        if not isinstance(text, str):
            raise SourceError(f"{self.description}: QMP human-monitor-command answered {str(text)[:60]}, not text")
        return text

    def _refuse_active_dump(self) -> None:
        status = self._query("query-dump", "status", "completed", "total")
        if status["status"] == "active":
            raise SourceError(f"{self.description}: QEMU is already writing a dump ({status['completed']} of "
                              f"{status['total']} bytes); wait for it to finish, then try again")

    # -- pausing ------------------------------------------------------------------------------

    def _pause(self) -> None:
        self.was_running = bool(self._query("query-status", "running")["running"])
        if self.was_running:
            self.execute("stop")
            self._paused_at = time.monotonic()

    def _resume(self) -> None:
        if self._paused_at is None:
            return
        paused_at, self._paused_at = self._paused_at, None
        try:
            if not self._lost:
                self.execute("cont")
        finally:
            self._paused_for = time.monotonic() - paused_at

    @property
    def paused_seconds(self) -> float:
        """Seconds windump has kept the guest paused (so far, while it still is)."""
        if self._paused_at is not None:
            return time.monotonic() - self._paused_at
        return self._paused_for

    def access(self) -> Access:
        return Access(self.memory_path or "", dict(self.path_problems), self.paused_seconds)

    def reading_done(self) -> None:
        """End the stream (if any) and resume the guest if windump paused it."""
        self._finish_reading()

    def _finish_reading(self) -> None:
        try:
            if self._stream is not None:
                stream, self._stream = self._stream, None
                try:
                    stream.drain()
                finally:
                    stream.close()
                    if not self._lost:
                        self._wait_dump_end()
        finally:
            self._resume()

    def close(self) -> None:
        """Resume a guest windump paused (reads abandoned midway included), then disconnect."""
        self._stack.close()

    # -- dumps into pipes and memfds ----------------------------------------------------------

    def _sink(self, fd: int) -> tuple[str, Callable[[], None]]:
        """Hand QEMU the write end ``fd`` over the unix socket: its protocol string and an undo."""
        name = f"windump-{os.getpid()}-{next(self._fd_names)}"
        try:
            self._qmp.send_fd_scm(fd)
        except (QMPError, OSError) as error:
            raise SourceError(f"{self.description}: cannot pass a file descriptor to QEMU: {error}") from None
        self.execute("getfd", fdname=name)

        def forget() -> None:  # QEMU keeps a passed fd until a dump takes it or closefd drops it
            with contextlib.suppress(SourceError):
                self.execute("closefd", fdname=name)

        return f"fd:{name}", forget

    def _fifo(self) -> tuple[str, int]:
        """A FIFO QEMU on this host opens by path (TCP carries no file descriptors): path, read end."""
        if self._fifo_dir is None:
            self._fifo_dir = tempfile.mkdtemp(prefix="windump-qmp-")
            os.chmod(self._fifo_dir, 0o711)
            self._stack.callback(shutil.rmtree, self._fifo_dir, True)
        path = os.path.join(self._fifo_dir, f"dump{next(self._fd_names)}")
        os.mkfifo(path, 0o622)
        os.chmod(path, 0o622)  # QEMU may run as another user; the directory cannot be listed
        read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(read_fd, True)
        return path, read_fd

    @contextlib.contextmanager
    def _small_elf(self, begin: int, length: int) -> Iterator[ElfSource]:
        """QEMU's ELF of ``[begin, begin + length)``: every note and those bytes, in a memfd."""
        memfd = os.memfd_create("windump-qmp", os.MFD_CLOEXEC)
        try:
            if self._unix:
                protocol, forget = self._sink(memfd)
                try:
                    self._dump(protocol, begin=begin, length=length)
                except BaseException:
                    forget()
                    raise
            else:
                stream = self._start_stream(begin=begin, length=length, parse=False)
                try:
                    stream.copy_to(memfd)
                finally:
                    stream.close()
                    self._wait_dump_end()
            source = ElfSource(f"/proc/self/fd/{memfd}")
        finally:
            os.close(memfd)
        source.description = f"{self.description} (dump-guest-memory of {begin:#x}+{length:#x})"
        try:
            yield source
        finally:
            source.close()

    @property
    def _unix(self) -> bool:
        return isinstance(self.address, str)

    def _dump(self, protocol: str, *, detach: bool = False, **arguments: object) -> None:
        self._qmp.clear_events()
        self.execute("dump-guest-memory", paging=False, protocol=protocol, format="elf", detach=detach, **arguments)
        if not detach:
            self._qmp.clear_events()

    def _start_stream(self, *, parse: bool = True, **arguments: object) -> ElfStream:
        """Start QEMU's detached ELF dump into a pipe and return its read end as a stream."""
        if self._unix:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):
                fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            try:
                protocol, forget = self._sink(write_fd)
            finally:
                os.close(write_fd)
        else:
            path, read_fd = self._fifo()
            protocol, forget = f"file:{path}", lambda: None
        try:
            self._dump(protocol, detach=True, **arguments)
        except BaseException:
            forget()
            os.close(read_fd)
            raise
        return ElfStream(read_fd, self.description, parse=parse)

    def _wait_dump_end(self) -> None:
        """Wait for QEMU's DUMP_COMPLETED; a failed dump is only an error if we still wanted it."""
        deadline = time.monotonic() + DUMP_END_TIMEOUT
        while self._query("query-dump", "status")["status"] == "active":
            if time.monotonic() > deadline:
                raise SourceError(f"{self.description}: QEMU's dump did not end within {DUMP_END_TIMEOUT:g} s")
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                self._qmp.pull_event(wait=0.05)
        self._qmp.clear_events()

    def _poll_progress(self) -> None:
        status = self._query("query-dump", "completed", "total")
        self.qemu_progress = (int(status["completed"]), int(status["total"]))
        if self.progress is not None:
            self.progress(*self.qemu_progress)

    # -- guest RAM ----------------------------------------------------------------------------

    def _missing_note(self) -> str:
        """Why there is no note: no vmcoreinfo device among -device's children, or a silent guest."""
        for container in ("/machine/peripheral", "/machine/peripheral-anon"):
            if any(child["type"] == "child<vmcoreinfo>" for child in self.execute("qom-list", path=container)):
                return NO_NOTE_MESSAGE
        return NO_DEVICE_MESSAGE

    def _open_memory(self, forced: str | None) -> None:
        openers = {"shm": self._open_shared_memory, "procmem": self._open_process_memory, "stream": self._open_stream}
        for name in ([forced] if forced else MEMORY_PATHS):
            problem = openers[name]()
            if problem is None:
                self.memory_path = name
                return
            self.path_problems[name] = problem
        raise SourceError(f"{self.description}: cannot read guest RAM through {forced}: {self.path_problems[forced]}")

    def _use_readers(self, readers: list[Callable[[int, memoryview], None] | None]) -> str | None:
        """Serve RAM through per-region readers ``read(offset into region, buffer)``, after checking
        the first page against QEMU's own ELF; regions without one are left out of :attr:`ram`."""
        kept = [(region, reader) for region, reader in zip(self._regions, readers) if reader is not None]
        if not kept or kept[0][0].start != self._probe[0]:
            return f"{self._regions[0].block} at {self._regions[0].start:#x} cannot be read this way"
        check = bytearray(PAGE_SIZE)
        try:
            kept[0][1](0, memoryview(check))
        except SourceError as error:
            return str(error)
        if check != self._probe[1]:
            return f"the first page of {kept[0][0].block} differs from QEMU's own dump of it"
        self._layout = ram_layout([region for region, _ in kept])
        self._readers = [reader for _, reader in kept]
        return None

    def _process_reader(self, process: ProcessMemory, host: int) -> Callable[[int, memoryview], None]:
        def read(offset: int, view: memoryview) -> None:
            try:
                process.readinto(host + offset, view)
            except SourceError:
                if os.path.exists(f"/proc/{process.pid}/mem") and not _is_zombie(process.pid):
                    raise
                self._lost = True  # no QEMU left to resume or to ask anything
                raise SourceError(f"{self.description}: QEMU (process {process.pid}) quit while its RAM was "
                                  f"being read") from None

        return read

    def _host_addresses(self) -> list[int] | str:
        addresses = []
        for region in self._regions:
            address = parse_host_address(self._hmp(f"gpa2hva {region.start:#x}"))
            if address is None:
                return f"gpa2hva gives no host address for {region.block} at {region.start:#x}"
            addresses.append(address)
        return addresses

    def _open_process(self) -> ProcessMemory | str:
        try:
            process = ProcessMemory(self.qemu_pid)
        except SourceError as error:
            return str(error)
        self._stack.callback(process.close)
        return process

    def _open_process_memory(self) -> str | None:
        hosts = self._host_addresses()
        if isinstance(hosts, str):
            return hosts
        process = self._open_process()
        if isinstance(process, str):
            return process
        return self._use_readers([self._process_reader(process, host) for host in hosts])

    def _mapping_reader(self, mapping: mmap.mmap, base: int) -> Callable[[int, memoryview], None]:
        memory = memoryview(mapping)
        self._stack.callback(memory.release)  # before the mapping closes

        def read(offset: int, view: memoryview) -> None:
            view[:] = memory[base + offset:base + offset + len(view)]

        return read

    def _shared_backends(self) -> dict[str, tuple[BinaryIO, mmap.mmap]] | str:
        """Every ``memory-backend-file,share=on``, open and mapped read-only, by id; or why there is none."""
        backends = [child["name"] for child in self.execute("qom-list", path="/objects")
                    if child["type"] == "child<memory-backend-file>"]
        if not backends:
            return "no memory-backend-file RAM backend (see -object memory-backend-file,share=on)"
        opened, problems = {}, []
        for name in backends:
            path = f"/objects/{name}"
            mem_path = self.execute("qom-get", path=path, property="mem-path")
            size = int(self.execute("qom-get", path=path, property="size"))
            if not self.execute("qom-get", path=path, property="share"):
                problems.append(f"backend {name} has share=off, so {mem_path} does not hold guest writes")
                continue
            try:
                file = open(mem_path, "rb", buffering=0)
            except OSError as error:
                problems.append(f"cannot open {mem_path} of backend {name}: {error.strerror}")
                continue
            self._stack.callback(file.close)
            try:
                mapping = mmap.mmap(file.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
            except (OSError, ValueError) as error:
                problems.append(f"cannot map {mem_path} of backend {name}: {getattr(error, 'strerror', None) or error}")
                continue
            self._stack.callback(mapping.close)
            opened[name] = (file, mapping)
        return opened or "; ".join(problems)

    def _open_shared_memory(self) -> str | None:
        backends = self._shared_backends()
        if isinstance(backends, str):
            return backends
        process = None
        if any(region.block not in backends for region in self._regions):
            hosts = self._host_addresses()
            process = self._open_process() if not isinstance(hosts, str) else hosts
        readers, files = [], []
        for i, region in enumerate(self._regions):
            if region.block in backends:
                file, mapping = backends[region.block]
                readers.append(self._mapping_reader(mapping, region.offset))
                files.append((region.start, file, region.offset))
            elif isinstance(process, ProcessMemory):
                readers.append(self._process_reader(process, hosts[i]))
            else:
                readers.append(None)
        problem = self._use_readers(readers)
        if problem is None:
            kept = {start: (file, offset) for start, file, offset in files}
            self._files = [kept.get(int(start)) for start in self._layout.starts]
        return problem

    def _open_stream(self) -> str | None:
        self._layout = ram_layout(self._regions)
        self._readers = None
        return None

    @property
    def ram(self) -> np.ndarray:
        return self._layout.ram

    def readinto(self, address: int, buffer: memoryview) -> None:
        view = memoryview(buffer).cast("B")
        self.check_range(address, len(view))
        if self._readers is None:
            self._read_streamed(address, view)
            return
        for region, offset, inside, length in self._layout.split(address, len(view)):
            self._readers[region](inside, view[offset:offset + length])

    def file_extents(self, address: int, length: int) -> list[FileExtent] | None:
        """Where a range lies in the shared RAM backend files, so the writer copies it in the kernel."""
        if not self._files:
            return None
        self.check_range(address, length)
        extents = []
        for region, _, inside, piece in self._layout.split(address, length):
            backing = self._files[region]
            if backing is None:
                return None
            file, base = backing
            extents.append(FileExtent(file, base + inside, piece))
        return extents

    def _read_streamed(self, address: int, view: memoryview) -> None:
        """From the page cache, a one-page ELF (before the stream), or the stream (forward only)."""
        page = address & ~(PAGE_SIZE - 1)
        within_page = address + len(view) <= page + PAGE_SIZE
        if within_page and page in self._pages:
            view[:] = self._pages[page][address - page:address - page + len(view)]
            return
        if within_page and self._stream is None:
            with self._small_elf(page, PAGE_SIZE) as elf:
                self._pages[page] = elf.read(page, PAGE_SIZE)
            view[:] = self._pages[page][address - page:address - page + len(view)]
            return
        if self._stream is None:
            self._stream = self._start_stream()
            self._next_poll = PROGRESS_INTERVAL
        self._stream.readinto(address, view)
        if self._stream.position >= self._next_poll:
            self._next_poll = self._stream.position + PROGRESS_INTERVAL
            self._poll_progress()

    def vmcoreinfo(self) -> bytes | None:
        return self._vmcoreinfo

    def cpus(self) -> list[CpuState]:
        return self._cpus


def _is_zombie(pid: int) -> bool:
    """Whether process ``pid`` has exited and awaits its parent (its memory is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as status:
            return status.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


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
