"""Damaged input files and the one-line error each must give through the command line.

Every case starts from a sound file and changes one thing: a QEMU ELF dump of a small guest (its
ELF and program headers, its notes), the dump header a model Windows guest published in its
VMCOREINFO note (note size, magic, KDBG, physical-memory runs), or a crash dump read back with
``windump info``. ``BadFile.message`` is what follows ``windump: error: `` with ``{path}`` standing
for the file name given on the command line; ``prefix`` marks messages whose tail lists what the
loaded plugins offer.
"""

from __future__ import annotations

import functools
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elfmaker import TinyGuest, note, write_qemu_elf
from windump_plugins.formats.dumpheader import DUMP_HEADER64, X64, new_header, set_header_runs
from windump_plugins.guest.model import CrashedGuest
from windump_plugins.source import CpuState

#: The small guest whose ELF the structural cases damage: two RAM blocks, two vCPUs.
TINY_RAM = [(0, 0xA0000), (0x100000, 0x180000)]
TINY_CPUS = [CpuState(i, {"rip": 0xFFFFF80000001000 + i, "cs": 0x10, "cr3": 0x1AD000}) for i in range(2)]
TINY_NOTE = note(b"VMCOREINFO", 0, b"PAGEDU64" + bytes(0x2000 - 8))

#: The model Windows guest whose published header the header cases damage (the smallest RAM that
#: holds its image): its runs are [1, 159] and [0x100, 0x700].
MODEL_RAM = [(0, 0xA0000), (0x100000, 0x800000)]

#: Offsets in an ELF64 header and program header (System V gABI), written out independently of
#: the parser's numpy layouts.
E_TYPE, E_MACHINE, E_PHOFF, E_SHOFF, E_PHENTSIZE, E_PHNUM = 0x10, 0x12, 0x20, 0x28, 0x36, 0x38
P_TYPE, P_OFFSET, P_PADDR, P_FILESZ = 0x00, 0x08, 0x18, 0x20
PHDR_SIZE, SHDR_SIZE = 56, 64
SH_INFO = 0x2C
PN_XNUM = 0xFFFF


@dataclass(frozen=True)
class BadFile:
    """One damaged input: ``make(path)`` writes it, ``argv`` runs windump on it (``{path}``
    replaced), and windump must answer ``windump: error: MESSAGE``, exit 1, and write nothing."""

    name: str
    make: Callable[[Path], None]
    message: str
    argv: tuple[str, ...] = ("save", "{path}", "out.dmp")
    prefix: bool = False


class Elf:
    """A sound ELF's bytes with helpers that change one field (little endian, ELF64)."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.phoff = struct.unpack_from("<Q", data, E_PHOFF)[0]
        self.phnum = struct.unpack_from("<H", data, E_PHNUM)[0]

    def phdr(self, index: int, field_offset: int) -> int:
        return self.phoff + PHDR_SIZE * index + field_offset

    def get(self, fmt: str, offset: int) -> int:
        return struct.unpack_from(fmt, self.data, offset)[0]

    def set(self, fmt: str, offset: int, value: int) -> Elf:
        struct.pack_into(fmt, self.data, offset, value)
        return self

    def cut(self, size: int) -> Elf:
        del self.data[size:]
        return self

    @property
    def notes(self) -> tuple[int, int]:
        """File offset and size of PT_NOTE 0."""
        return self.get("<Q", self.phdr(0, P_OFFSET)), self.get("<Q", self.phdr(0, P_FILESZ))

    def load(self, index: int) -> tuple[int, int, int]:
        """``(p_paddr, p_offset, p_filesz)`` of program header ``index``."""
        return (self.get("<Q", self.phdr(index, P_PADDR)), self.get("<Q", self.phdr(index, P_OFFSET)),
                self.get("<Q", self.phdr(index, P_FILESZ)))


def _written(write: Callable[[Path], object]) -> bytes:
    """The bytes ``write(path)`` puts in a fresh file."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "elf"
        write(path)
        return path.read_bytes()


@functools.cache
def tiny_elf(**options) -> bytes:
    """The tiny guest as QEMU 7.2 writes it: PT_NOTE, PT_LOADs 1 and 2 for RAM, 3 for the BIOS."""
    options = {"cpus": TINY_CPUS, "vmcoreinfo": TINY_NOTE, **options}
    return _written(lambda path: write_qemu_elf(path, TinyGuest(TINY_RAM), **options))


@functools.cache
def model_guest() -> CrashedGuest:
    return CrashedGuest(ram=MODEL_RAM, cpus=2)


def model_header() -> np.ndarray:
    """A writable copy of the header the model guest published."""
    return np.frombuffer(bytearray(model_guest().note[24:]), DUMP_HEADER64).reshape(())


def vmcoreinfo(desc: bytes, descsz: int | None = None) -> bytes:
    """The guest's VMCOREINFO note record around ``desc`` (24-byte header, as the fwcfg driver writes)."""
    return struct.pack("<III", 11, len(desc) if descsz is None else descsz, 0) + b"VMCOREINFO\0\0" + desc


@functools.cache
def _model_elf(note_record: bytes) -> bytes:
    return _written(lambda path: write_qemu_elf(path, model_guest(), vmcoreinfo=note_record))


def writes(data: Callable[[], bytes | bytearray]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.write_bytes(bytes(data()))
    return make


def elf_with(change: Callable[[Elf], object], **options) -> Callable[[Path], None]:
    """The tiny guest's ELF after ``change``."""
    def data() -> bytearray:
        elf = Elf(tiny_elf(**options))
        change(elf)
        return elf.data
    return writes(data)


def model_elf_with(change: Callable[[np.ndarray], object] | None = None, *, note_record: bytes | None = None
                   ) -> Callable[[Path], None]:
    """The model guest's ELF, its published header changed by ``change`` (or the whole note replaced)."""
    def data() -> bytes:
        if note_record is not None:
            return _model_elf(note_record)
        header = model_header()
        change(header)
        return _model_elf(vmcoreinfo(header.tobytes()))
    return writes(data)


def with_runs(runs) -> Callable[[np.ndarray], None]:
    return lambda header: set_header_runs(header, np.array(runs, dtype=np.uint64))


def _notes_end(elf: Elf) -> int:
    offset, size = elf.notes
    return offset + size


def _overlap_conflict() -> tuple[str, Callable[[Path], None]]:
    """PT_LOAD 2 moved to physical 0x50000, inside PT_LOAD 1, its bytes at another file offset."""
    elf = Elf(tiny_elf())
    _, offset1, _ = elf.load(1)
    _, offset2, _ = elf.load(2)
    message = (f"{{path}}: PT_LOAD 2 puts physical 0x50000-0xa0000 at file offset {offset2:#x}, but PT_LOAD 1 "
               f"puts it at {offset1 + 0x50000:#x}")
    return message, elf_with(lambda e: e.set("<Q", e.phdr(2, P_PADDR), 0x50000))


def _ram_cut() -> tuple[str, Callable[[Path], None]]:
    elf = Elf(tiny_elf())
    _, offset, size = elf.load(1)
    message = (f"{{path}}: PT_LOAD 1 (physical 0x0-0xa0000) is truncated: it ends at file offset "
               f"{offset + size:#x}, the file has {offset + 0x1000:#x}")
    return message, elf_with(lambda e: e.cut(offset + 0x1000))


def _notes_cut() -> tuple[str, Callable[[Path], None]]:
    offset, size = Elf(tiny_elf()).notes
    message = f"{{path}}: truncated in PT_NOTE 0: needs file bytes {offset:#x}-{offset + size:#x}, the file has {offset + 16:#x}"
    return message, elf_with(lambda e: e.cut(offset + 16))


def _huge_note() -> tuple[str, Callable[[Path], None]]:
    offset, size = Elf(tiny_elf()).notes
    message = (f"{{path}}: PT_NOTE 0: note 0 claims a 5-byte name and a 4294967280-byte descriptor, past the "
               f"end of its {size}-byte segment")
    return message, elf_with(lambda e: e.set("<I", offset + 4, 0xFFFFFFF0))


def _note_header_cut() -> tuple[str, Callable[[Path], None]]:
    offset, size = Elf(tiny_elf()).notes
    # Four bytes more: the segment now ends inside a sixth note's 12-byte header.
    message = f"{{path}}: PT_NOTE 0: truncated in the header of note 5 at segment offset {size:#x}"
    return message, elf_with(lambda e: e.set("<Q", e.phdr(0, P_FILESZ), size + 4))


def _elf_cases() -> list[BadFile]:
    derived = {name: build() for name, build in (
        ("overlapping PT_LOADs disagree", _overlap_conflict), ("RAM cut", _ram_cut), ("notes cut", _notes_cut),
        ("note claims 4 GiB", _huge_note), ("note header cut", _note_header_cut))}
    phoff = Elf(tiny_elf()).phoff
    phnum = Elf(tiny_elf()).phnum
    cases = [
        BadFile("empty", writes(lambda: b""), "{path} is empty"),
        BadFile("MZ executable", writes(lambda: b"MZ\x90\0" + bytes(60)),
                "{path}: no plugin reads this file (starts with b'MZ\\x90\\x00\\x00\\x00\\x00\\x00'); known sources:",
                prefix=True),
        BadFile("ELF ident cut", elf_with(lambda e: e.cut(10)), "{path}: truncated in the ELF header (10 bytes)"),
        BadFile("ELF header cut", elf_with(lambda e: e.cut(40)), "{path}: truncated in the ELF header (40 of 64 bytes)"),
        BadFile("ELF class 3", elf_with(lambda e: e.set("B", 4, 3)),
                "{path}: ELF class 3 is neither ELFCLASS32 nor ELFCLASS64"),
        BadFile("big endian", elf_with(lambda e: e.set("B", 5, 2)),
                "{path}: ELF data encoding 2 is not little endian (ELFDATA2LSB)"),
        BadFile("executable, not core", elf_with(lambda e: e.set("<H", E_TYPE, 2)),
                "{path}: ELF type 2 is not a core file (ET_CORE)"),
        BadFile("aarch64", elf_with(lambda e: e.set("<H", E_MACHINE, 183)),
                "{path}: ELF machine 183 is neither x86-64 (62) nor i386 (3)"),
        BadFile("e_phentsize", elf_with(lambda e: e.set("<H", E_PHENTSIZE, 32)),
                "{path}: e_phentsize 32 is not the 56 bytes of an ELFCLASS64 program header"),
        BadFile("program headers past the end", elf_with(lambda e: e.set("<Q", E_PHOFF, 1 << 40)),
                f"{{path}}: truncated in the program headers: needs file bytes {1 << 40:#x}-"
                f"{(1 << 40) + phnum * PHDR_SIZE:#x}, the file has {len(tiny_elf()):#x}"),
        BadFile("65535 program headers claimed", elf_with(lambda e: e.set("<H", E_PHNUM, 0xFFFE)),
                f"{{path}}: truncated in the program headers: needs file bytes {phoff:#x}-"
                f"{phoff + 0xFFFE * PHDR_SIZE:#x}, the file has {len(tiny_elf()):#x}"),
        BadFile("PN_XNUM without section headers",
                elf_with(lambda e: e.set("<H", E_PHNUM, PN_XNUM).set("<Q", E_SHOFF, 0)),
                "{path}: e_phnum is PN_XNUM but there is no 64-byte section header 0 to hold the program header count"),
        BadFile("PN_XNUM count absurd",
                elf_with(lambda e: e.set("<H", E_PHNUM, PN_XNUM).set("<I", e.get("<Q", E_SHOFF) + SH_INFO, 5_000_000)),
                "{path}: 5000000 program headers is absurd (a QEMU dump has at most 4194304)"),
        BadFile("PN_XNUM count past the end",
                elf_with(lambda e: e.set("<H", E_PHNUM, PN_XNUM).set("<I", e.get("<Q", E_SHOFF) + SH_INFO, 1 << 22)),
                f"{{path}}: truncated in the program headers: needs file bytes {phoff:#x}-"
                f"{phoff + (1 << 22) * PHDR_SIZE:#x}, the file has {len(tiny_elf()):#x}"),
        BadFile("PT_NOTE of 4 GiB", elf_with(lambda e: e.set("<Q", e.phdr(0, P_FILESZ), 1 << 32)),
                "{path}: PT_NOTE 0 claims 4294967296 bytes of notes, more than any QEMU dump holds (16777216)"),
        BadFile("PT_NOTE of 15 MiB in a small file", elf_with(lambda e: e.set("<Q", e.phdr(0, P_FILESZ), 15 << 20)),
                f"{{path}}: truncated in PT_NOTE 0: needs file bytes {Elf(tiny_elf()).notes[0]:#x}-"
                f"{Elf(tiny_elf()).notes[0] + (15 << 20):#x}, the file has {len(tiny_elf()):#x}"),
        BadFile("no PT_LOAD", elf_with(lambda e: [e.set("<I", e.phdr(i, P_TYPE), 0) for i in (1, 2, 3)]),
                "{path}: no PT_LOAD segment with data: the ELF holds no guest memory"),
        BadFile("PT_LOAD wraps the address space",
                elf_with(lambda e: e.set("<Q", e.phdr(1, P_PADDR), 0xFFFFFFFFFFFFF000)),
                "{path}: PT_LOAD 1 (physical 0xfffffffffffff000, 0xa0000 bytes) runs past the end of the physical "
                "address space"),
        BadFile("PT_LOAD offset past the end", elf_with(lambda e: e.set("<Q", e.phdr(1, P_OFFSET), 1 << 62)),
                f"{{path}}: PT_LOAD 1 (physical 0x0-0xa0000) is truncated: it ends at file offset "
                f"{(1 << 62) + 0xA0000:#x}, the file has {len(tiny_elf()):#x}"),
        BadFile("QEMU CPU state version 2",
                elf_with(lambda e: e.set("<I", e.data.index(b"QEMU\0") + 8, 2)),
                "{path}: QEMUCPUState version 2 is not the known version 1"),
        BadFile("QEMU CPU state too short", writes(lambda: tiny_elf(cpu_state_size=0x100)),
                "{path}: QEMU CPU state note of 256 bytes is shorter than QEMUCPUState (0x1b0 bytes)"),
        BadFile("CORE prstatus of 200 bytes",
                writes(lambda: tiny_elf(cpus=(), vmcoreinfo=note(b"CORE", 1, bytes(200)) + TINY_NOTE)),
                "{path}: CORE NT_PRSTATUS note of 200 bytes is neither the x86-64 (336) nor the i386 (144) prstatus"),
    ]
    cases += [BadFile(name, make, message) for name, (message, make) in derived.items()]
    return cases


#: User-space addresses the model's page tables leave unmapped (PML4 entries 254 and 255).
UNMAPPED, UNMAPPED_TOO = 254 << 39, 255 << 39


def not_mapped(address: int) -> str:
    """The TranslationError of the model's OwnerTag read at KDBG ``address``: its PML4 entry is empty."""
    entry = model_guest().directory_table_base + 8 * (address >> 39)
    return (f"virtual address {address + 0x10:#x} does not translate: its PML4 entry 0x0 at physical {entry:#x} "
            f"is not present")


def _header_cases() -> list[BadFile]:
    page = b"PAGE" * (0x2000 // 4)
    kdbg = model_guest().kdbg_address
    return [
        BadFile("no VMCOREINFO note", model_elf_with(note_record=b""),
                "the guest published no VMCOREINFO note: is `-device vmcoreinfo` on the QEMU command line and the "
                "fwcfg driver running in the guest? (see docs: QEMU set-up)"),
        BadFile("note of 0x1818 bytes", model_elf_with(note_record=vmcoreinfo(b"PAGEDU64" + bytes(0x1800 - 8))),
                "win-dump: invalid vmcoreinfo note size: the guest's note is 0x1818 bytes, expected 0x2018 (x64) or "
                "0x1018 (x86)"),
        BadFile("note of a PAGE-filled header with no magic", model_elf_with(note_record=vmcoreinfo(b"XAGE" + page[4:])),
                "not a Windows dump header: signature b'XAGE', expected b'PAGE'"),
        BadFile("ValidDump DU32", model_elf_with(note_record=vmcoreinfo(b"PAGEDU32" + page[8:])),
                "not a Windows dump header: ValidDump b'DU32', expected b'DU64' or b'DUMP'"),
        BadFile("x86 magic in an x64-sized note", model_elf_with(note_record=vmcoreinfo(b"PAGEDUMP" + page[8:])),
                "the VMCOREINFO note holds a PAGE/DUMP dump header but is 0x2018 bytes, expected 0x1018"),
        BadFile("32-bit guest", model_elf_with(note_record=vmcoreinfo(b"PAGEDUMP" + page[8:0x1000])),
                "32-bit guests are not supported yet: the VMCOREINFO note holds a PAGE/DUMP dump header"),
        BadFile("descsz disagrees with the note's length",
                model_elf_with(note_record=vmcoreinfo(bytes(model_header().tobytes()), descsz=0x2000 - 4)[:-4]),
                "win-dump: invalid vmcoreinfo note size: the guest's note is 0x2014 bytes, expected 0x2018 (x64) or "
                "0x1018 (x86)"),
        BadFile("NumberOfRuns 43",
                model_elf_with(lambda h: h["PhysicalMemoryBlock"].__setitem__("NumberOfRuns", 43)),
                "PhysicalMemoryBlock.NumberOfRuns is 43, at most 42 fit in the header"),
        BadFile("NumberOfRuns 0xffffffff",
                model_elf_with(lambda h: h["PhysicalMemoryBlock"].__setitem__("NumberOfRuns", 0xFFFFFFFF)),
                "PhysicalMemoryBlock.NumberOfRuns is 4294967295, at most 42 fit in the header"),
        BadFile("runs unsorted", model_elf_with(with_runs([[0x100, 0x700], [1, 159]])),
                "run 1 (pages 0x1-0x9f, bytes 0x1000-0x9ffff) starts below run 0 (runs must be sorted by BasePage)"),
        BadFile("runs overlap", model_elf_with(with_runs([[1, 159], [0x9F, 1]])),
                "run 1 (pages 0x9f-0x9f, bytes 0x9f000-0x9ffff) overlaps run 0"),
        BadFile("run in a hole", model_elf_with(with_runs([[1, 159], [0xA0, 1]])),
                "run 1 (pages 0xa0-0xa0, bytes 0xa0000-0xa0fff) is not in the source's RAM (QEMU would write zero "
                "pages there)"),
        BadFile("run past the end of RAM", model_elf_with(with_runs([[1, 160]])),
                "run 0 (pages 0x1-0xa0, bytes 0x1000-0xa0fff) runs past the end of RAM range 0x0-0x9ffff (QEMU "
                "would write zero pages there)"),
        BadFile("empty run", model_elf_with(with_runs([[1, 0], [0x100, 0x700]])),
                "run 0 (BasePage 0x1, PageCount 0) is empty"),
        BadFile("run beyond 64 bits", model_elf_with(with_runs([[1, 159], [0xFFFFFFFFFFFFF, 2]])),
                "run 1 (pages 0xfffffffffffff-0x10000000000000, bytes 0xfffffffffffff000-0x10000000000000fff) lies "
                "beyond the 64-bit physical address space"),
        BadFile("NumberOfPages wrong",
                model_elf_with(lambda h: h["PhysicalMemoryBlock"].__setitem__("NumberOfPages", 1)),
                "PhysicalMemoryBlock.NumberOfPages is 0x1 but its runs hold 0x79f pages"),
        BadFile("no KDBG anywhere",
                model_elf_with(lambda h: [h.__setitem__("KdDebuggerDataBlock", UNMAPPED),
                                          h.__setitem__("BugCheckParameter1", UNMAPPED_TOO)]),
                f"no KDBG block: KdDebuggerDataBlock {UNMAPPED:#x} (OwnerTag is unreadable: {not_mapped(UNMAPPED)}) "
                f"seems to be encrypted, and BugCheckParameter1 {UNMAPPED_TOO:#x} (OwnerTag is unreadable: "
                f"{not_mapped(UNMAPPED_TOO)}) holds no decoded copy"),
        BadFile("KDBG at a non-canonical address",
                model_elf_with(lambda h: [h.__setitem__("KdDebuggerDataBlock", 0x8000_0000_0000_0000),
                                          h.__setitem__("BugCheckParameter1", UNMAPPED_TOO)]),
                "no KDBG block: KdDebuggerDataBlock 0x8000000000000000 (OwnerTag is unreadable: virtual address "
                "0x8000000000000010 does not translate: it is not canonical for x86-64 paging (48-bit)) seems to be "
                f"encrypted, and BugCheckParameter1 {UNMAPPED_TOO:#x} (OwnerTag is unreadable: "
                f"{not_mapped(UNMAPPED_TOO)}) holds no decoded copy"),
        BadFile("KDBG at the last virtual byte",
                model_elf_with(lambda h: [h.__setitem__("KdDebuggerDataBlock", 0xFFFF_FFFF_FFFF_FFF8),
                                          h.__setitem__("BugCheckParameter1", UNMAPPED_TOO)]),
                "no KDBG block: KdDebuggerDataBlock 0xfffffffffffffff8 (OwnerTag is unreadable: virtual range "
                "0x10000000000000008+0x4 is outside the 64-bit address space) seems to be encrypted, and "
                f"BugCheckParameter1 {UNMAPPED_TOO:#x} (OwnerTag is unreadable: {not_mapped(UNMAPPED_TOO)}) holds "
                "no decoded copy"),
        BadFile("page tables outside RAM",
                model_elf_with(lambda h: h.__setitem__("DirectoryTableBase", 0x10000000)),
                f"no KDBG block: KdDebuggerDataBlock {kdbg:#x} (OwnerTag is unreadable: {{path}}: physical range "
                "0x10000000-0x10001000 is not in guest RAM) seems to be encrypted, and BugCheckParameter1 0x0 "
                "(OwnerTag is unreadable: {path}: physical range 0x10000000-0x10001000 is not in guest RAM) holds "
                "no decoded copy"),
        BadFile("vCPU 7 asked of two", model_elf_with(lambda h: None),
                "the header context cannot show vCPU 7: {path} has vCPUs 0-1",
                argv=("save", "--context-cpu", "7", "{path}", "out.dmp")),
    ]


def dump_file(change: Callable[[np.ndarray], object] | None = None, *, pages: int = 2, cut: int | None = None
              ) -> Callable[[Path], None]:
    """A full dump of ``pages`` zero pages from physical 0x1000, its header changed by ``change``."""
    def make(path: Path) -> None:
        header = new_header(X64)
        set_header_runs(header, np.array([[1, pages]], dtype=np.uint64))
        header["DumpType"] = 1
        header["NumberProcessors"] = 1
        header["RequiredDumpSpace"] = X64.size + pages * 0x1000
        if change is not None:
            change(header)
        data = header.tobytes() + bytes(pages * 0x1000)
        path.write_bytes(data[:cut])
    return make


def _dump_cases() -> list[BadFile]:
    info = ("info", "{path}")
    return [
        BadFile("info: missing file", lambda path: None, "cannot open {path}: No such file or directory", argv=info),
        BadFile("info: a directory", lambda path: path.mkdir(), "cannot open {path}: Is a directory", argv=info),
        BadFile("info: empty", writes(lambda: b""),
                "{path}: not a Windows dump header: signature b'', expected b'PAGE'", argv=info),
        BadFile("info: an ELF", writes(lambda: tiny_elf()),
                "{path}: not a Windows dump header: signature b'\\x7fELF', expected b'PAGE'", argv=info),
        BadFile("info: ValidDump DU32", dump_file(lambda h: h.__setitem__("ValidDump", b"DU32")),
                "{path}: not a Windows dump header: ValidDump b'DU32', expected b'DU64' or b'DUMP'", argv=info),
        BadFile("info: x64 header cut", dump_file(cut=108),
                "{path}: truncated x64 dump header: 108 bytes, expected 0x2000", argv=info),
        BadFile("info: x86 header cut", writes(lambda: b"PAGEDUMP"),
                "{path}: truncated x86 dump header: 8 bytes, expected 0x1000", argv=info),
        BadFile("verify: a directory", lambda path: path.mkdir(), "cannot open {path}: Is a directory",
                argv=("verify", "{path}")),
    ]


def bad_files() -> list[BadFile]:
    """Every damaged file, for ``windump save`` (ELF, notes, header, runs) and ``windump info``."""
    return _elf_cases() + _header_cases() + _dump_cases()


def _huge_system_time(header: np.ndarray) -> None:
    header["SystemTime"] = 0xFFFF_FFFF_FFFF_FFFF


#: Damaged dumps ``windump verify`` must report, one line per problem (exit 1), with a line each
#: must contain; and ``windump info`` must still describe (exit 0).
BAD_DUMPS: dict[str, tuple[Callable[[Path], None], str]] = {
    "NumberOfRuns 43": (dump_file(lambda h: h["PhysicalMemoryBlock"].__setitem__("NumberOfRuns", 43)),
                        "PhysicalMemoryBlock.NumberOfRuns is 43, at most 42 fit in the header"),
    "DumpType 5": (dump_file(lambda h: h.__setitem__("DumpType", 5)), "DumpType 5 (bitmap) is not supported yet"),
    "NumberProcessors 0xffffffff": (
        dump_file(lambda h: [h.__setitem__("NumberProcessors", 0xFFFFFFFF), h.__setitem__("KdDebuggerDataBlock", 0)]),
        "NumberProcessors is 4294967295, more than the 2048 processors Windows runs on"),
    "runs overlap": (dump_file(lambda h: set_header_runs(h, np.array([[1, 2], [2, 1]], dtype=np.uint64))),
                     "run 1 (pages 0x2-0x2, bytes 0x2000-0x2fff) overlaps run 0"),
    "run wraps the address space": (
        dump_file(lambda h: set_header_runs(h, np.array([[0xFFFF_FFFF_FFFF_FFFF, 2]], dtype=np.uint64))),
        "run 0 (pages 0xffffffffffffffff-0x10000000000000000, bytes 0xffffffffffffffff000-0x10000000000000000fff) lies "
        "beyond the 64-bit physical address space"),
    "SystemTime at the end of time": (dump_file(_huge_system_time), "KdDebuggerDataBlock is 0: readers cannot find KDBG"),
    "cut by a page": (dump_file(cut=X64.size + 0x1000), "file size is 12288 bytes, header and runs make 16384"),
}
