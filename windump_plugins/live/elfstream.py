"""QEMU's ELF dump read front to back from a pipe, as ``dump-guest-memory`` writes it through a
passed file descriptor: guest memory served once, in physical order, with no file on disk."""

from __future__ import annotations

import os

import numpy as np

from ..errors import FormatError, SourceError
from ..formats.elf import (
    EI_NIDENT,
    PT_LOAD,
    elf_class,
    needs_section0,
    parse_elf_header,
    parse_program_headers,
    program_header_count,
)


class ElfStream:
    """QEMU's ELF dump read front to back from a pipe: guest bytes served in file (= physical) order.

    ``position`` is the file offset reached; reads behind it fail, since the pipe cannot rewind.
    """

    def __init__(self, fd: int, description: str, *, parse: bool = True) -> None:
        self.fd = fd
        self.description = description
        self.position = 0
        self._scratch = bytearray(1 << 20)
        self._devnull: int | None = None
        if not parse:
            return
        try:
            self._read_headers()
        except BaseException:
            self.close()
            raise

    def _fail(self, what: str) -> FormatError:
        return FormatError(f"{self.description}: QEMU's dump stream {what}")

    def _take(self, length: int) -> bytes:
        data = bytearray(length)
        self._read_exact(memoryview(data))
        return bytes(data)

    def _read_headers(self) -> None:
        """Read the ELF and program headers (and the section header they may need) off the stream,
        and set up the PT_LOADs in file order."""
        where = f"{self.description}: QEMU's dump stream"
        ident = self._take(EI_NIDENT)
        found = elf_class(ident, where)
        data = ident + self._take(found.ehdr.itemsize - EI_NIDENT)
        found, ehdr = parse_elf_header(data, where)
        phoff = int(ehdr["e_phoff"])
        section0 = None
        if needs_section0(ehdr):
            shoff = int(ehdr["e_shoff"])
            if shoff < len(data) or shoff > phoff:
                raise self._fail("has its PN_XNUM section header after the program headers")
            data += self._take(shoff + found.shdr.itemsize - len(data))
            section0 = data[shoff:]
        phnum = program_header_count(found, ehdr, section0, where)
        table_end = phoff + phnum * found.phdr.itemsize
        if phoff < len(data):
            raise self._fail("has its program headers inside the ELF header")
        data += self._take(table_end - len(data))
        phdrs = parse_program_headers(data[phoff:table_end], found)
        loads = phdrs[(phdrs["p_type"] == PT_LOAD) & (phdrs["p_filesz"] > 0)]
        order = np.argsort(loads["p_offset"], kind="stable")
        self._offsets = loads["p_offset"][order].astype(np.uint64)
        self._starts = loads["p_paddr"][order].astype(np.uint64)
        self._ends = self._starts + loads["p_filesz"][order].astype(np.uint64)
        if len(self._offsets) and int(self._offsets[0]) < self.position:
            raise self._fail("puts guest memory before its program headers")
        self._load = 0

    def readinto(self, address: int, view: memoryview) -> None:
        """Fill ``view`` with guest physical bytes from ``address``, skipping forward as needed."""
        done = 0
        while done < len(view):
            at = address + done
            while self._load < len(self._starts) and int(self._ends[self._load]) <= at:
                self._load += 1  # segments wholly behind ``at``
            inside = self._load < len(self._starts) and int(self._starts[self._load]) <= at
            offset = int(self._offsets[self._load]) + at - int(self._starts[self._load]) if inside else -1
            if offset < self.position:
                raise SourceError(f"{self.description}: physical {at:#x} is not ahead in QEMU's dump stream "
                                  f"(it passes guest memory once, in physical order)")
            self._skip(offset - self.position)
            length = min(len(view) - done, int(self._ends[self._load]) - at)
            self._read_exact(view[done:done + length])
            done += length

    def _read_exact(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            count = os.readv(self.fd, [view[done:]])
            if count == 0:
                raise SourceError(f"{self.description}: QEMU's dump stream ended at byte {self.position:#x} "
                                  f"(did QEMU quit, or the dump fail?)")
            done += count
            self.position += count

    def _skip(self, length: int) -> None:
        while length > 0:
            count = os.splice(self.fd, self._devnull_fd(), length)
            if count == 0:
                raise SourceError(f"{self.description}: QEMU's dump stream ended at byte {self.position:#x} "
                                  f"(did QEMU quit, or the dump fail?)")
            length -= count
            self.position += count

    def drain(self) -> None:
        """Read the rest of the stream, so QEMU ends its dump normally."""
        while True:
            count = os.splice(self.fd, self._devnull_fd(), 1 << 30)
            if count == 0:
                return
            self.position += count

    def _devnull_fd(self) -> int:
        if self._devnull is None:
            self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        return self._devnull

    def copy_to(self, fd: int) -> None:
        """Copy the whole stream into ``fd`` (a memfd)."""
        while True:
            count = os.readv(self.fd, [self._scratch])
            if count == 0:
                return
            os.write(fd, memoryview(self._scratch)[:count])
            self.position += count

    def close(self) -> None:
        os.close(self.fd)
        if self._devnull is not None:
            os.close(self._devnull)
            self._devnull = None
