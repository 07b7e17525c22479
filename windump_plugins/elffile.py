"""Guest memory, vCPU registers and the VMCOREINFO note of a QEMU ``dump-guest-memory`` ELF file
 (format ``elf``, 64- or 32-bit, x86-64 or i386 guest).

Each PT_LOAD with file bytes is a block of guest physical memory at ``p_paddr``; reads go straight
from the file into the caller's buffer with ``preadv``, and :meth:`ElfSource.file_extents` tells the
writer where a range lies so it can ``copy_file_range``. The ELF is parsed by hand with the layouts
of :mod:`windump_plugins.formats.elf`: every damage then ends in one FormatError naming the file,
and QEMU 7.2's quirks (``e_ehsize`` 8, section headers before the program headers, PT_LOADs at
unaligned offsets, a BIOS ROM block at 0xfffc0000, files of mode 0400) need no special cases.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import FormatError, SourceError
from .filemap import FileMap, FileMapSource
from .formats.elf import (
    EI_NIDENT,
    MAX_NOTE_SEGMENT,
    PT_LOAD,
    PT_NOTE,
    ElfClass,
    elf_class,
    needs_section0,
    parse_elf_header,
    parse_program_headers,
    program_header_count,
)
from .formats.elfnotes import cpu_registers, parse_notes, vmcoreinfo_note
from .source import CpuState


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
            self._cpus = [CpuState(i, registers) for i, registers in enumerate(cpu_registers(notes, self.description))]
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
        found = elf_class(os.pread(self._file.fileno(), EI_NIDENT, 0), self.description)
        return parse_elf_header(os.pread(self._file.fileno(), found.ehdr.itemsize, 0), self.description)

    def _read_program_headers(self, found: ElfClass, ehdr: np.void) -> np.ndarray:
        section0 = None
        if needs_section0(ehdr) and ehdr["e_shoff"] != 0 and ehdr["e_shentsize"] == found.shdr.itemsize:
            section0 = self._pread(int(ehdr["e_shoff"]), found.shdr.itemsize,
                                   "section header 0 (the program header count under PN_XNUM)")
        phnum = program_header_count(found, ehdr, section0, self.description)
        table = self._pread(int(ehdr["e_phoff"]), phnum * found.phdr.itemsize, "the program headers")
        return parse_program_headers(table, found)

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
        # One piece per run of segments that overlap or touch with the same file layout (QEMU writes
        # each RAM block as one PT_LOAD per memory region, back to back): reads, lookups and kernel
        # copies then see one piece where the file has one stretch.
        touches = np.zeros(start.size, bool)
        touches[1:] = start[1:] == reach[:-1]
        joined = overlaps | (touches & np.append(False, delta[1:] == delta[:-1]))
        first = np.flatnonzero(~joined)
        last = np.append(first[1:], start.size) - 1
        self.memory = FileMap(self._file, start[first], reach[last], offset[first], self.description)

    def vmcoreinfo(self) -> bytes | None:
        return self._vmcoreinfo

    def cpus(self) -> list[CpuState]:
        return self._cpus

    def close(self) -> None:
        self._file.close()
