"""The ``gdb://HOST:PORT`` source: a live QEMU guest read through QEMU's gdbstub.

Attaching stops the VM. Guest RAM comes from ``info mtree -f``; reads go, when QEMU runs on this
host and lets us, straight from its process memory at the addresses ``gpa2hva`` gives (the
same-host path of :mod:`windump_plugins.live.samehost`, shared with ``qmp:``), else through the
stub in physical-memory mode (``Qqemu.PhyMemMode:1``, restored once reading is done, see
:mod:`windump_plugins.live.phymemmode`). windump never writes guest memory.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from ..errors import SourceError, WindumpError, WindumpWarning
from ..formats.vmcoreinfo import NOTE_HEADER_SIZE, parse_note
from ..hookspecs import SourceKind, hookimpl
from ..live.hmp import RamRegion, parse_ram_map, ram_layout
from ..live.layers import MemoryPath, PathUnavailable, RamReader, open_first
from ..live.packets import PacketRam
from ..live.phymemmode import PhyMemMode
from ..live.procmem import peer_pid
from ..live.rsp import RemoteStub
from ..live.samehost import same_host_ram
from ..location import Option, address, host_and_port, parse_options, seconds
from ..notescan import scan_for_note
from ..source import Access, CpuState, MemorySource

#: gdb register names that CpuState spells differently.
_REGISTER_NAMES = {"eflags": "rflags", "k_gs_base": "kernel_gs_base"}

#: The CONTEXT's debug registers: QEMU's x86 gdbstub offers none of them, HMP ``info registers`` all.
DEBUG_REGISTERS = ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7")

#: HMP command showing every vCPU's registers, each block opened by ``CPU#N`` (QEMU's CPU index).
INFO_REGISTERS = "info registers -a"

#: Seconds a fresh connection, made to leave QEMU as found when ours was lost, may take per reply.
RECONNECT_TIMEOUT = 3.0

#: The ``?`` options of a ``gdb://`` location; gdb's ``windump-save`` takes those that apply there.
OPTIONS = (
    Option("keep-stopped", "leave the VM stopped after the dump; by default a VM found running runs on"),
    Option("header-pa", "physical address of the guest's published VMCOREINFO note or of the dump header in "
           "it, instead of scanning RAM for it", type=address, metavar="ADDR"),
    Option("packets", "read RAM with the stub's m packets even when QEMU's process memory can be read"),
    Option("timeout", "seconds to wait for each reply of the stub", type=seconds, metavar="S", default="10"),
)

_HMP_CPU = re.compile(r"^CPU#(\d+)[ \t]*$", re.MULTILINE)
_HMP_DEBUG_REGISTER = re.compile(r"\bDR([0-7])=([0-9a-fA-F]+)\b")


def parse_debug_registers(text: str) -> list[tuple[int, dict[str, int]]]:
    """``(CPU index, registers)`` of each vCPU block of HMP ``info registers -a``, in QEMU's CPU
    order, ``registers`` holding DR0-3, DR6 and DR7, or empty when the block lacks any of them.

    QEMU prints them 16 digits wide in long mode and register-wide otherwise; a YMM or ZMM dump
    instead of XMM, or lines added by a later QEMU, change nothing here.
    """
    blocks = _HMP_CPU.split(text)[1:]
    parsed = []
    for index, block in zip(blocks[::2], blocks[1::2]):
        registers = {f"dr{number}": int(value, 16) for number, value in _HMP_DEBUG_REGISTER.findall(block)}
        parsed.append((int(index), registers if set(DEBUG_REGISTERS) <= registers.keys() else {}))
    return parsed


def parse_location(location: str) -> dict | None:
    """Keyword arguments of :class:`GdbStubSource` for ``gdb://HOST:PORT[?OPTIONS]``, None for other schemes."""
    parts = urllib.parse.urlsplit(location)
    if parts.scheme != "gdb":
        return None
    host, port = host_and_port(location, parts, "expected gdb://HOST:PORT, e.g. gdb://127.0.0.1:1234")
    return {"host": host, "port": port, **parse_options(location, parts.query, OPTIONS)}


class QemuStub(Protocol):
    """What :class:`GdbStubSource` needs of a connection to QEMU's gdbstub: :class:`RemoteStub`
    (our own socket) or :class:`~windump_plugins.live.gdbconnection.GdbConnection` (gdb's)."""

    address: str

    @property
    def stopped_running_vm(self) -> bool:
        """Whether attaching stopped a running VM (then leaving resumes it, unless keep-stopped)."""

    def require_qemu(self) -> set[str]: ...
    def phy_mem_mode(self) -> int: ...
    def set_phy_mem_mode(self, mode: int) -> None: ...
    def monitor(self, command: str) -> str: ...
    def read_memory(self, address: int, length: int) -> bytes: ...
    def readinto(self, address: int, buffer: memoryview) -> None: ...
    def vcpu_registers(self) -> list[dict[str, int]]: ...
    def detach(self) -> None: ...
    def close(self) -> None: ...

    @property
    def connection(self) -> socket.socket | None:
        """The TCP socket to the stub when there is one, to find the QEMU process at its other end."""


class GdbStubSource(MemorySource):
    """Guest physical memory and vCPU registers of a QEMU reached through its gdbstub.

    The stub connection is the base; guest RAM is read by the first of two readers that opens over
    it, in this order: ``procmem`` (QEMU's process memory, same host) and ``packets`` (``m``
    requests through the stub; ``packets`` forces it). :meth:`access` says which, and why.

    Attaching switches the stub to physical memory (:class:`PhyMemMode`). Once reading is done
    (:meth:`reading_done`, else :meth:`close`) PhyMemMode is restored and, when the VM was
    running when we attached and ``keep_stopped`` is false, the stub is detached so the guest runs
    on; a VM found paused stays paused. When our connection was lost or left out of step, that
    happens over a fresh one. :meth:`through` reads through a connection someone else holds
    (gdb's), which is never detached.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        keep_stopped: bool = False,
        header_pa: int | None = None,
        packets: bool = False,
        timeout: float = 10.0,
    ) -> None:
        self._setup(f"gdb://{host}:{port}", header_pa)
        self.keep_stopped = keep_stopped
        try:
            with self._noting_interruptions():
                stub = self._stack.enter_context(RemoteStub(host, port, timeout))
                self._attach(stub, packets, resume=not keep_stopped,
                             reconnect=lambda: RemoteStub(host, port, timeout=RECONNECT_TIMEOUT))
        except BaseException:
            self._stack.close()
            raise

    @classmethod
    def through(cls, stub: QemuStub, *, description: str, header_pa: int | None = None,
                packets: bool = False) -> GdbStubSource:
        """A source reading through ``stub``, which it closes on :meth:`close`; the VM is never resumed."""
        source = cls.__new__(cls)
        source._setup(description, header_pa)
        source.keep_stopped = True
        source._stack.callback(stub.close)
        try:
            with source._noting_interruptions():
                source._attach(stub, packets, resume=False, reconnect=None)
        except BaseException:
            source._stack.close()
            raise
        return source

    def _setup(self, description: str, header_pa: int | None) -> None:
        self.description = description
        self.header_pa = header_pa
        self.vmcoreinfo_address: int | None = None
        self.qemu_pid: int | None = None
        self._stack = contextlib.ExitStack()
        #: When windump attached, and when it was done with QEMU (PhyMemMode restored, VM resumed).
        self._attached_at = time.monotonic()
        self._left_at: float | None = None
        #: Whether anything but a WindumpError (Ctrl-C) left one of our reads midway.
        self._interrupted = False

    def _attach(self, stub: QemuStub, packets: bool, *, resume: bool,
                reconnect: Callable[[], AbstractContextManager[QemuStub]] | None) -> None:
        """Check it is QEMU, switch to physical memory (until :meth:`_leave`), open a RAM reader."""
        self.stub = stub
        if "PhyMemMode" not in stub.require_qemu():
            raise SourceError(f"{self.description}: this QEMU gdbstub offers no PhyMemMode, so it cannot read "
                              f"physical memory (a newer QEMU can)")
        self._phy_mem_mode = PhyMemMode(stub, resume=resume, reconnect=reconnect)
        self._stack.callback(self._leave)
        regions = parse_ram_map(stub.monitor("info mtree -f"))
        if not regions:
            raise SourceError(f"{self.description}: the guest has no RAM in \"info mtree -f\"")
        paths: list[MemoryPath] = [
            ("procmem", lambda: self._same_host_ram(regions)),
            ("packets", lambda: PacketRam(stub, ram_layout(regions))),
        ]
        self._reader, self._passed_over = open_first(paths, forced="packets" if packets else None,
                                                     description=self.description)
        self._stack.callback(self._reader.close)

    def _same_host_ram(self, regions: list[RamRegion]) -> RamReader:
        """QEMU's process memory, when QEMU is the local peer of the stub's TCP connection."""
        connection = self.stub.connection
        pid = None if connection is None else peer_pid(connection)
        if pid is None:
            raise PathUnavailable("QEMU is not a process on this host (or not visible to us)" if connection is not None
                                  else "the connection to the stub is not a TCP socket of this process")
        reader = same_host_ram(pid, regions, self.stub.monitor, trusted=self.stub.read_memory,
                               whose="what the stub reads there", description=self.description)
        self.qemu_pid = pid
        return reader

    def _leave(self) -> None:
        """Leave QEMU as found (see :class:`PhyMemMode`), once."""
        if self._left_at is None:
            self._left_at = time.monotonic()
            self._phy_mem_mode.leave(interrupted=self._interrupted)

    @contextlib.contextmanager
    def _noting_interruptions(self) -> Iterator[None]:
        try:
            yield
        except WindumpError:
            raise
        except BaseException:
            self._interrupted = True
            raise

    def access(self) -> Access:
        """The RAM path, why ``procmem`` was passed over, and the seconds the guest was paused: from
        attaching until windump was done with QEMU when attaching stopped a running VM (with
        keep-stopped it stays paused after), 0.0 when the VM was stopped already (by gdb too)."""
        paused = 0.0
        if self.stub.stopped_running_vm:
            paused = (self._left_at if self._left_at is not None else time.monotonic()) - self._attached_at
        return Access(self._reader.name, dict(self._passed_over), paused)

    @property
    def ram(self) -> np.ndarray:
        return self._reader.ram

    def readinto(self, address: int, buffer: memoryview) -> None:
        view = memoryview(buffer).cast("B")
        self.check_range(address, len(view))
        if self._left_at is not None:
            raise RuntimeError(f"{self.description}: guest RAM read after reading_done()")
        with self._noting_interruptions():
            self._reader.readinto(address, view)

    def vmcoreinfo(self) -> bytes | None:
        """The guest's VMCOREINFO note: at ``header_pa`` (the note's or its dump header's address)
        when given, else the first found in RAM.

        The gdbstub cannot see the fw_cfg file where the guest published the note's address, so
        RAM is scanned from the bottom, a chunk at a time, stopping at the first valid note.
        """
        if self.header_pa is not None:
            # The note's address as the guest published it, or that of the dump header inside it.
            for address in (self.header_pa, self.header_pa - NOTE_HEADER_SIZE):
                with contextlib.suppress(SourceError):
                    size = parse_note(self.read(address, NOTE_HEADER_SIZE + 8))
                    if size is not None:
                        self.vmcoreinfo_address = address
                        return self.read(address, size)
            raise SourceError(f"{self.description}: no VMCOREINFO note with a dump header "
                              f"at header-pa {self.header_pa:#x}")
        found = scan_for_note(self)
        if found is None:
            return None
        self.vmcoreinfo_address, note = found
        return note

    def cpus(self) -> list[CpuState]:
        """Registers of each vCPU (gdbstub thread) as the stub reports them, with the debug
        registers from HMP (see :meth:`debug_registers`)."""
        with self._noting_interruptions():
            states = self.stub.vcpu_registers()
            debug = self.debug_registers(len(states))
        return [
            CpuState(index, {**debug[index],
                             **{_REGISTER_NAMES.get(name, name): value for name, value in registers.items()}})
            for index, registers in enumerate(states)
        ]

    def debug_registers(self, count: int) -> list[dict[str, int]]:
        """DR0-3, DR6 and DR7 of each of the ``count`` vCPUs, from HMP ``info registers -a``.

        QEMU's x86 gdbstub has no debug registers. One monitor command gives every vCPU's, and
        leaves alone the monitor's selected CPU (``cpu N``), which QEMU keeps for every later gdb
        connection. Both HMP and the stub's thread list go in QEMU's CPU order. A vCPU whose block
        is missing or lacks a register gets none, with a warning: its CONTEXT then declares no
        debug registers rather than wrong ones.
        """
        blocks = parse_debug_registers(self.stub.monitor(INFO_REGISTERS))
        if len(blocks) != count:
            warnings.warn(f"{self.description}: HMP \"{INFO_REGISTERS}\" shows {len(blocks)} vCPUs, the stub {count}: "
                          f"no processor CONTEXT carries debug registers", WindumpWarning, stacklevel=3)
            return [{}] * count
        missing = [str(index) for index, registers in blocks if not registers]
        if missing:
            warnings.warn(f"{self.description}: HMP \"{INFO_REGISTERS}\" shows no DR0-3, DR6 and DR7 for vCPU "
                          f"{', '.join(missing)}: its CONTEXT carries no debug registers", WindumpWarning, stacklevel=3)
        return [registers for _, registers in blocks]

    def reading_done(self) -> None:
        """Leave QEMU as found now, so the guest is paused no longer than the reads took."""
        self._leave()

    def close(self) -> None:
        self._stack.close()


@hookimpl
def windump_open_location(location: str) -> MemorySource | None:
    arguments = parse_location(location)
    if arguments is None:
        return None
    return GdbStubSource(**arguments)


@hookimpl
def windump_source_kinds() -> list[SourceKind]:
    return [SourceKind("gdb://HOST:PORT[?OPTIONS]",
                       "a live QEMU through its gdbstub (-s or -gdb tcp::PORT); stops the VM while attached", OPTIONS)]
