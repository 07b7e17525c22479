"""The ``elf`` source: guest memory, vCPU registers and the VMCOREINFO note of a QEMU
``dump-guest-memory`` ELF file (format ``elf``, 64- or 32-bit, x86-64 or i386 guest).

Each PT_LOAD with file bytes is a block of guest physical memory at ``p_paddr``; reads go straight
from the file into the caller's buffer with ``preadv``, and :meth:`ElfSource.file_extents` tells the
writer where a range lies so it can ``copy_file_range``. The ELF is parsed by hand with the layouts
below: every damage then ends in one FormatError naming the file, and QEMU 7.2's quirks (``e_ehsize``
8, section headers before the program headers, PT_LOADs at unaligned offsets, a BIOS ROM block at
0xfffc0000, files of mode 0400) need no special cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..elfnotes import cpu_states, parse_notes, vmcoreinfo_note
from ..errors import FormatError, SourceError
from ..filemap import FileMap, FileMapSource
from ..format import layout
from ..hookspecs import SourceKind, hookimpl
from ..source import CpuState, MemorySource

ELFMAG = b"\x7fELF"
EI_NIDENT = 16
EI_CLASS, EI_DATA = 4, 5
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_CORE = 4
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
#: e_phnum when the real count (QEMU: 0xFFFF or more PT_LOADs) is in section header 0's sh_info.
PN_XNUM = 0xFFFF

#: More program headers than a paging-mode dump of a large guest has: beyond this, the count is damage.
MAX_PROGRAM_HEADERS = 1 << 22
#: More note bytes than any vCPU count gives (about 800 bytes a vCPU plus an 8 KiB VMCOREINFO note).
MAX_NOTE_SEGMENT = 16 << 20

ELF64_EHDR = layout(64, [
    (0x00, "e_ident", ("u1", EI_NIDENT)), (0x10, "e_type", "<u2"), (0x12, "e_machine", "<u2"),
    (0x14, "e_version", "<u4"), (0x18, "e_entry", "<u8"), (0x20, "e_phoff", "<u8"), (0x28, "e_shoff", "<u8"),
    (0x30, "e_flags", "<u4"), (0x34, "e_ehsize", "<u2"), (0x36, "e_phentsize", "<u2"), (0x38, "e_phnum", "<u2"),
    (0x3A, "e_shentsize", "<u2"), (0x3C, "e_shnum", "<u2"), (0x3E, "e_shstrndx", "<u2"),
])
ELF32_EHDR = layout(52, [
    (0x00, "e_ident", ("u1", EI_NIDENT)), (0x10, "e_type", "<u2"), (0x12, "e_machine", "<u2"),
    (0x14, "e_version", "<u4"), (0x18, "e_entry", "<u4"), (0x1C, "e_phoff", "<u4"), (0x20, "e_shoff", "<u4"),
    (0x24, "e_flags", "<u4"), (0x28, "e_ehsize", "<u2"), (0x2A, "e_phentsize", "<u2"), (0x2C, "e_phnum", "<u2"),
    (0x2E, "e_shentsize", "<u2"), (0x30, "e_shnum", "<u2"), (0x32, "e_shstrndx", "<u2"),
])
ELF64_PHDR = layout(56, [
    (0x00, "p_type", "<u4"), (0x04, "p_flags", "<u4"), (0x08, "p_offset", "<u8"), (0x10, "p_vaddr", "<u8"),
    (0x18, "p_paddr", "<u8"), (0x20, "p_filesz", "<u8"), (0x28, "p_memsz", "<u8"), (0x30, "p_align", "<u8"),
])
ELF32_PHDR = layout(32, [
    (0x00, "p_type", "<u4"), (0x04, "p_offset", "<u4"), (0x08, "p_vaddr", "<u4"), (0x0C, "p_paddr", "<u4"),
    (0x10, "p_filesz", "<u4"), (0x14, "p_memsz", "<u4"), (0x18, "p_flags", "<u4"), (0x1C, "p_align", "<u4"),
])
#: Only sh_info matters here: section header 0 carries the program header count under PN_XNUM.
ELF64_SHDR = layout(64, [(0x2C, "sh_info", "<u4")])
ELF32_SHDR = layout(40, [(0x1C, "sh_info", "<u4")])


@dataclass(frozen=True)
class ElfClass:
    """The header layouts of one ELF class."""

    name: str
    ehdr: np.dtype
    phdr: np.dtype
    shdr: np.dtype


ELF_CLASSES = {
    ELFCLASS64: ElfClass("ELFCLASS64", ELF64_EHDR, ELF64_PHDR, ELF64_SHDR),
    ELFCLASS32: ElfClass("ELFCLASS32", ELF32_EHDR, ELF32_PHDR, ELF32_SHDR),
}
MACHINES = {EM_X86_64: "x86-64", EM_386: "i386"}


class ElfSource(FileMapSource):
    """Guest physical memory as a QEMU ``dump-guest-memory`` ELF file holds it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.description = os.fspath(path)
        try:
            self._file = open(path, "rb", buffering=0)  # QEMU creates its dumps mode 0400
        except OSError as error:
            raise SourceError(f"{self.description}: cannot open: {error.strerror}") from None
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            elf_class, ehdr = self._read_elf_header()
            phdrs = self._read_program_headers(elf_class, ehdr)
            notes = []
            for i in np.flatnonzero((phdrs["p_type"] == PT_NOTE) & (phdrs["p_filesz"] > 0)):
                notes += parse_notes(self._read_notes(phdrs[i], f"PT_NOTE {i}"), f"{self.description}: PT_NOTE {i}")
            self._cpus = cpu_states(notes, self.description)
            self._vmcoreinfo = vmcoreinfo_note(notes)
            self._map_physical_memory(phdrs)
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what: str) -> FormatError:
        return FormatError(f"{self.description}: {what}")

    def _pread(self, offset: int, length: int, what: str) -> bytes:
        """``length`` file bytes at ``offset``, or FormatError when the file ends before them."""
        if offset + length > self._size:
            raise self._fail(f"truncated in {what}: needs file bytes {offset:#x}-{offset + length:#x}, "
                             f"the file has {self._size:#x}")
        return os.pread(self._file.fileno(), length, offset)

    def _read_elf_header(self) -> tuple[ElfClass, np.void]:
        head = os.pread(self._file.fileno(), ELF64_EHDR.itemsize, 0)
        if not head:
            raise self._fail("empty file, not a QEMU ELF dump")
        if not head.startswith(ELFMAG):
            raise self._fail("not an ELF file (no \\x7fELF magic)")
        if len(head) < EI_NIDENT:
            raise self._fail(f"truncated in the ELF header ({len(head)} bytes)")
        elf_class = ELF_CLASSES.get(head[EI_CLASS])
        if elf_class is None:
            raise self._fail(f"ELF class {head[EI_CLASS]} is neither ELFCLASS32 nor ELFCLASS64")
        if head[EI_DATA] != ELFDATA2LSB:
            raise self._fail(f"ELF data encoding {head[EI_DATA]} is not little endian (ELFDATA2LSB)")
        if len(head) < elf_class.ehdr.itemsize:
            raise self._fail(f"truncated in the ELF header ({len(head)} of {elf_class.ehdr.itemsize} bytes)")
        ehdr = np.frombuffer(head, elf_class.ehdr, 1)[0]
        if ehdr["e_type"] != ET_CORE:
            raise self._fail(f"ELF type {ehdr['e_type']} is not a core file (ET_CORE)")
        if int(ehdr["e_machine"]) not in MACHINES:
            raise self._fail(f"ELF machine {ehdr['e_machine']} is neither x86-64 ({EM_X86_64}) nor i386 ({EM_386})")
        return elf_class, ehdr

    def _read_program_headers(self, elf_class: ElfClass, ehdr: np.void) -> np.ndarray:
        phnum = int(ehdr["e_phnum"])
        if phnum == PN_XNUM:
            if ehdr["e_shoff"] == 0 or ehdr["e_shentsize"] != elf_class.shdr.itemsize:
                raise self._fail(f"e_phnum is PN_XNUM but there is no {elf_class.shdr.itemsize}-byte section "
                                 f"header 0 to hold the program header count")
            section0 = self._pread(int(ehdr["e_shoff"]), elf_class.shdr.itemsize,
                                   "section header 0 (the program header count under PN_XNUM)")
            phnum = int(np.frombuffer(section0, elf_class.shdr)[0]["sh_info"])
        if phnum > MAX_PROGRAM_HEADERS:
            raise self._fail(f"{phnum} program headers is absurd (a QEMU dump has at most {MAX_PROGRAM_HEADERS})")
        if phnum and ehdr["e_phentsize"] != elf_class.phdr.itemsize:
            raise self._fail(f"e_phentsize {ehdr['e_phentsize']} is not the {elf_class.phdr.itemsize} bytes "
                             f"of an {elf_class.name} program header")
        table = self._pread(int(ehdr["e_phoff"]), phnum * elf_class.phdr.itemsize, "the program headers")
        return np.frombuffer(table, elf_class.phdr).astype(
            [(name, "<u8") for name in elf_class.phdr.names])

    def _read_notes(self, phdr: np.void, what: str) -> bytes:
        if phdr["p_filesz"] > MAX_NOTE_SEGMENT:
            raise self._fail(f"{what} claims {int(phdr['p_filesz'])} bytes of notes, more than any QEMU dump "
                             f"holds ({MAX_NOTE_SEGMENT})")
        return self._pread(int(phdr["p_offset"]), int(phdr["p_filesz"]), what)

    def _map_physical_memory(self, phdrs: np.ndarray) -> None:
        """Build the sorted pieces ``[start, end) -> file offset`` and the merged RAM ranges.

        Paging-mode dumps map one physical block through many PT_LOADs: segments that overlap must
        agree on where the shared bytes lie in the file.
        """
        index = np.flatnonzero((phdrs["p_type"] == PT_LOAD) & (phdrs["p_filesz"] > 0))
        if not index.size:
            raise self._fail("no PT_LOAD segment with data: the ELF holds no guest memory")
        loads = phdrs[index]
        start, length, offset = loads["p_paddr"], loads["p_filesz"], loads["p_offset"]
        wraps = np.flatnonzero(start > ~length)
        if wraps.size:
            i = wraps[0]
            raise self._fail(f"PT_LOAD {index[i]} (physical {int(start[i]):#x}, {int(length[i]):#x} bytes) runs "
                             f"past the end of the physical address space")
        past_end = np.flatnonzero((offset > self._size) | (length > np.uint64(self._size) - offset))
        if past_end.size:
            i = past_end[0]
            raise self._fail(f"PT_LOAD {index[i]} (physical {int(start[i]):#x}-{int(start[i] + length[i]):#x}) is "
                             f"truncated: it ends at file offset {int(offset[i]) + int(length[i]):#x}, the file has "
                             f"{self._size:#x}")

        order = np.argsort(start, kind="stable")
        index, start, end, offset = index[order], start[order], start[order] + length[order], offset[order]
        delta = offset.astype(np.int64) - start.astype(np.int64)  # file offset minus physical address
        reach = np.maximum.accumulate(end)
        overlaps = np.zeros(start.size, bool)
        overlaps[1:] = start[1:] < reach[:-1]
        conflicts = np.flatnonzero(overlaps[1:] & (delta[1:] != delta[:-1])) + 1
        if conflicts.size:
            i = conflicts[0]
            j = max(k for k in range(i) if end[k] > start[i])  # the earlier segment it overlaps
            raise self._fail(f"PT_LOAD {index[i]} puts physical {int(start[i]):#x}-{int(min(end[i], end[j])):#x} "
                             f"at file offset {int(offset[i]):#x}, but PT_LOAD {index[j]} puts it at "
                             f"{int(offset[j]) + int(start[i]) - int(start[j]):#x}")
        first = np.flatnonzero(~overlaps)
        last = np.append(first[1:], start.size) - 1
        self.memory = FileMap(self._file, start[first], reach[last], offset[first], self.description)

    def vmcoreinfo(self) -> bytes | None:
        return self._vmcoreinfo

    def cpus(self) -> list[CpuState]:
        return self._cpus

    def close(self) -> None:
        self._file.close()


@hookimpl
def windump_open_file(path: str, head: bytes) -> MemorySource | None:
    """Open ``path`` when it starts with the ELF magic."""
    return ElfSource(path) if head.startswith(ELFMAG) else None


@hookimpl
def windump_source_kinds() -> list[SourceKind]:
    return [SourceKind("FILE.elf", "a QEMU dump-guest-memory ELF file (x86-64 or i386 guest, 64- or 32-bit ELF)")]
