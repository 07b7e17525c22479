"""The ``elf`` source: a QEMU ``dump-guest-memory`` ELF file (format ``elf``, 64- or 32-bit, x86-64
or i386 guest), recognised by its magic and read by :class:`windump_plugins.elffile.ElfSource`."""

from __future__ import annotations

from ..elffile import ElfSource
from ..formats.elf import ELFMAG
from ..hookspecs import SourceKind, hookimpl
from ..source import MemorySource


@hookimpl
def windump_open_file(path: str, head: bytes) -> MemorySource | None:
    """Open ``path`` when it starts with the ELF magic."""
    return ElfSource(path) if head.startswith(ELFMAG) else None


@hookimpl
def windump_source_kinds() -> list[SourceKind]:
    return [SourceKind("FILE.elf", "a QEMU dump-guest-memory ELF file (x86-64 or i386 guest, 64- or 32-bit ELF)")]
