"""ELF as QEMU's ``dump-guest-memory`` writes it: the header and program-header layouts of both
classes, and the one parser of them that every ELF reader (the file source, the streamed dump) uses,
so every reader makes the same checks and says the same words about damage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from .dumpheader import layout

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


def elf_class(ident: bytes, where: str) -> ElfClass:
    """The class of the ELF whose first bytes are ``ident``: FormatError ``WHERE: ...`` unless they
    are a little-endian ELF of class 32 or 64."""
    if not ident:
        raise FormatError(f"{where}: empty file, not a QEMU ELF dump")
    if not ident.startswith(ELFMAG):
        raise FormatError(f"{where}: not an ELF file (no \\x7fELF magic)")
    if len(ident) < EI_NIDENT:
        raise FormatError(f"{where}: truncated in the ELF header ({len(ident)} bytes)")
    found = ELF_CLASSES.get(ident[EI_CLASS])
    if found is None:
        raise FormatError(f"{where}: ELF class {ident[EI_CLASS]} is neither ELFCLASS32 nor ELFCLASS64")
    if ident[EI_DATA] != ELFDATA2LSB:
        raise FormatError(f"{where}: ELF data encoding {ident[EI_DATA]} is not little endian (ELFDATA2LSB)")
    return found


def parse_elf_header(head: bytes, where: str) -> tuple[ElfClass, np.void]:
    """The class and ELF header at the start of ``head``, checked to be a QEMU core file of an
    x86-64 or i386 guest."""
    found = elf_class(head, where)
    if len(head) < found.ehdr.itemsize:
        raise FormatError(f"{where}: truncated in the ELF header ({len(head)} of {found.ehdr.itemsize} bytes)")
    ehdr = np.frombuffer(head, found.ehdr, 1)[0]
    if ehdr["e_type"] != ET_CORE:
        raise FormatError(f"{where}: ELF type {ehdr['e_type']} is not a core file (ET_CORE)")
    if int(ehdr["e_machine"]) not in MACHINES:
        raise FormatError(f"{where}: ELF machine {ehdr['e_machine']} is neither x86-64 ({EM_X86_64}) "
                          f"nor i386 ({EM_386})")
    return found, ehdr


def needs_section0(ehdr: np.void) -> bool:
    """Whether the program-header count is in section header 0 (PN_XNUM)."""
    return int(ehdr["e_phnum"]) == PN_XNUM


def program_header_count(found: ElfClass, ehdr: np.void, section0: bytes | None, where: str) -> int:
    """How many program headers there are: ``e_phnum``, or section header 0's ``sh_info`` (its bytes
    in ``section0``) under PN_XNUM; checked against :data:`MAX_PROGRAM_HEADERS` and ``e_phentsize``."""
    phnum = int(ehdr["e_phnum"])
    if phnum == PN_XNUM:
        if section0 is None or ehdr["e_shoff"] == 0 or ehdr["e_shentsize"] != found.shdr.itemsize:
            raise FormatError(f"{where}: e_phnum is PN_XNUM but there is no {found.shdr.itemsize}-byte section "
                              f"header 0 to hold the program header count")
        phnum = int(np.frombuffer(section0, found.shdr, 1)[0]["sh_info"])
    if phnum > MAX_PROGRAM_HEADERS:
        raise FormatError(f"{where}: {phnum} program headers is absurd (a QEMU dump has at most {MAX_PROGRAM_HEADERS})")
    if phnum and ehdr["e_phentsize"] != found.phdr.itemsize:
        raise FormatError(f"{where}: e_phentsize {ehdr['e_phentsize']} is not the {found.phdr.itemsize} bytes "
                          f"of an {found.name} program header")
    return phnum


def parse_program_headers(table: bytes, found: ElfClass) -> np.ndarray:
    """The program headers in ``table``, every field widened to u8 whatever the class."""
    return np.frombuffer(table, found.phdr).astype([(name, "<u8") for name in found.phdr.names or ()])
