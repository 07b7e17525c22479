"""The memory-source interface: what every source of guest memory gives the rest of windump.

A source reads guest *physical* memory and reports what it knows of the machine: its RAM ranges,
the guest's published VMCOREINFO note and the vCPU registers. It knows nothing of address
translation or dump writing; those live elsewhere and talk to any source through this class.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple, Self

import numpy as np

from .errors import SourceError


@dataclass
class CpuState:
    """One vCPU's registers as the source saw them.

    ``registers`` maps lower-case names to integers: ``rax`` .. ``r15``, ``rip``, ``rflags``,
    the selectors ``cs ds es fs gs ss``, ``fs_base gs_base kernel_gs_base``, ``cr0 cr2 cr3 cr4``,
    and where the source has them ``dr0``-``dr7``, ``mxcsr``, ``xmm0``-``xmm15`` (128-bit), ``fctrl``
    and friends. A source sets only what it really has.
    """

    index: int
    registers: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Access:
    """How a source reached guest memory, as the save report, ``-v`` and ``--json`` show it.

    ``path`` names the memory path that served the reads (``file``, ``model``, ``procmem``,
    ``shm``, ``stream``, ``packets`` ...); ``passed_over`` maps each faster path that was not used
    to why, in the order they were tried; ``paused_seconds`` is how long windump kept a running
    guest paused (0.0 when it found the guest paused, None for a source with no live guest).
    """

    path: str
    passed_over: dict[str, str] = field(default_factory=dict)
    paused_seconds: float | None = None


class FileExtent(NamedTuple):
    """Guest bytes that lie as-is in a file, so the writer can copy them in the kernel."""

    file: BinaryIO
    offset: int
    length: int


class MemorySource(abc.ABC):
    """Guest physical memory and machine state; use it as a context manager or call :meth:`close`."""

    #: What the user named, for messages and the dump's Comment (e.g. ``"elf:guest.elf"``).
    description: str = ""

    #: True for a source that resumes a guest it paused in :meth:`reading_done`: save then has the writer
    #: keep the reads as short as it can, leaving writeback to the final fsync instead of starting
    #: it chunk by chunk (which shortens the whole dump but slows the copy itself).
    resumes_after_reading: bool = False

    @property
    @abc.abstractmethod
    def ram(self) -> np.ndarray:
        """The guest RAM this source can read: an ``(N, 2)`` uint64 array of ``[start, end)``
        physical byte ranges, sorted and not overlapping."""

    @abc.abstractmethod
    def readinto(self, address: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with guest physical memory from ``address``.

        Raises SourceError when any byte of the range is not in :attr:`ram`.
        """

    def read(self, address: int, length: int) -> bytes:
        """``length`` bytes of guest physical memory from ``address`` (SourceError outside RAM)."""
        buffer = bytearray(length)
        self.readinto(address, memoryview(buffer))
        return bytes(buffer)

    def file_extents(self, address: int, length: int) -> list[FileExtent] | None:
        """Where the range lies verbatim in an open file, or None when it does not.

        File-backed sources override this so the writer copies with ``copy_file_range``.
        """
        return None

    def vmcoreinfo(self) -> bytes | None:
        """The guest's published VMCOREINFO note (24-byte note header, then the dump header), or
        None when the guest published none."""
        return None

    def cpus(self) -> list[CpuState]:
        """Every vCPU's registers, in the hypervisor's CPU order; empty when the source has none."""
        return []

    def access(self) -> Access:
        """How this source reads guest memory; live sources override it (see :class:`Access`)."""
        return Access("file" if type(self).file_extents is not MemorySource.file_extents else "direct")

    def reading_done(self) -> None:
        """Called once every byte the dump needs has been read, before the output is synced.

        Live sources resume a guest they paused here, so the pause lasts no longer than the reads;
        :meth:`close` must still resume it when this was never called (an error midway).
        """

    def close(self) -> None:
        """Release files, sockets and mappings; a live guest is left as it was found."""

    def check_range(self, address: int, length: int) -> None:
        """Raise SourceError unless ``[address, address + length)`` lies inside one RAM range."""
        check_in_ram(self.ram, address, length, self.description or "source")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_in_ram(ram: np.ndarray, address: int, length: int, description: str, where: str = "guest RAM") -> None:
    """Raise SourceError unless ``[address, address + length)`` lies inside one of the sorted
    ``[start, end)`` ``ram`` ranges; ``where`` names them in the message."""
    i = int(np.searchsorted(ram[:, 0], np.uint64(address), side="right")) - 1
    if length < 0 or i < 0 or address + length > int(ram[i, 1]):
        raise SourceError(f"{description}: physical range {address:#x}-{address + length:#x} is not in {where}")
