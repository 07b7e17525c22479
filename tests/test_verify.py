"""``verify_dump`` finds each corruption of a sound dump with its exact problem line, and
``describe_dump`` shows the header's facts."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from test_writer import MemoryGuest

from windump_plugins.guest import model as guestmodel
from windump_plugins.formats.context import CONTEXT
from windump_plugins.formats.dumpheader import X64, X86, body_size, header_bytes, new_header, set_header_runs
from windump_plugins.guest.model import CrashedGuest
from windump_plugins.sources.sample import SampleSource
from windump_plugins.verify import NO_KERNEL_CONTEXT, describe_dump, verify_dump
from windump_plugins.writer import write_dump

CONTEXT_FLAGS = CONTEXT.fields["ContextFlags"][1]
SEG_CS = CONTEXT.fields["SegCs"][1]


class PatchedGuest(SampleSource):
    """The model guest with some physical bytes overwritten: ``patches`` maps address -> bytes."""

    def __init__(self, guest: CrashedGuest, patches: dict[int, bytes]):
        super().__init__(guest)
        self.patches = patches

    def readinto(self, address: int, buffer: memoryview) -> None:
        super().readinto(address, buffer)
        for at, data in self.patches.items():
            lo, hi = max(at, address), min(at + len(data), address + len(buffer))
            if lo < hi:
                buffer[lo - address : hi - address] = data[lo - at : hi - at]


def sound_header(guest: CrashedGuest, runs=None) -> np.ndarray:
    """The model's published header made into a sound full dump's: pads and Comment zeroed, sizes
    right."""
    header = guest.header
    runs = guest.windows_runs() if runs is None else runs
    set_header_runs(header, runs)
    for pad in ("BugCheckCodePad", "DumpTypePad"):
        header[pad] = 0
    header["PhysicalMemoryBlock"]["Unused"] = 0
    header["Exception"]["Unused"] = 0
    header["Comment"] = b"windump test"
    header["SystemTime"] = guestmodel.SYSTEM_TIME
    for name in ("ProductType", "SuiteMask", "SecondaryDataState", "MiniDumpFields", "Attributes", "BootId"):
        header[name] = 0
    header["RequiredDumpSpace"] = X64.size + body_size(runs)
    return header


def write(tmp_path, header, guest: CrashedGuest, patches=None, runs=None, name="guest.dmp") -> str:
    path = str(tmp_path / name)
    runs = guest.windows_runs() if runs is None else runs
    write_dump(path, header_bytes(header), runs, PatchedGuest(guest, patches or {}))
    return path


#: Small RAM keeps each dump at 7.6 MiB: three ranges, the model's image at 4 MiB.
RAM = ((0, 0xA0000), (0x100000, 0x700000), (0x800000, 0x900000))


@pytest.fixture(scope="module")
def guest() -> CrashedGuest:
    return CrashedGuest(ram=RAM, cpus=3)


def physical(guest: CrashedGuest, va: int) -> int:
    return guest.virtual_to_physical(va)


def test_a_sound_dump_has_no_problems(tmp_path, guest):
    assert verify_dump(write(tmp_path, sound_header(guest), guest)) == []


def _set(field, value):
    def corrupt(header):
        header[field] = value
    return corrupt


def _set_block(field, value):
    def corrupt(header):
        header["PhysicalMemoryBlock"][field] = value
    return corrupt


def _set_context(offset, fmt, value):
    def corrupt(header):
        header["ContextRecord"][offset : offset + struct.calcsize(fmt)] = np.frombuffer(struct.pack(fmt, value), np.uint8)
    return corrupt


def _required_dump_space(header):
    header["RequiredDumpSpace"] -= 0x1000


def _page_in_exception(header):
    raw = bytearray(header.tobytes())
    raw[0xF00:0xF04] = raw[0xF40:0xF44] = b"PAGE"
    header[...] = np.frombuffer(bytes(raw), dtype=X64.dtype)[0]


def _number_of_pages(header):
    header["PhysicalMemoryBlock"]["NumberOfPages"] += 1


PAGE_WORD = 0x45474150

HEADER_CORRUPTIONS = {
    "DumpType 5": (_set("DumpType", 5), ["DumpType 5 (bitmap) is not supported yet"]),
    "DumpType 2": (_set("DumpType", 2), ["DumpType 2 is not supported (windump reads full dumps, DumpType 1)"]),
    "MachineImageType": (_set("MachineImageType", 0x14C), ["MachineImageType is 0x14c, expected 0x8664 in a PAGEDU64 dump"]),
    "NumberProcessors": (_set("NumberProcessors", 0), ["NumberProcessors is 0"]),
    "NumberOfRuns": (_set_block("NumberOfRuns", 43),
                     ["PhysicalMemoryBlock.NumberOfRuns is 43, at most 42 fit in the header"]),
    "NumberOfPages": (_number_of_pages, ["NumberOfPages is 1952, the runs hold 1951"]),
    "RequiredDumpSpace": (_required_dump_space, ["RequiredDumpSpace is 0x7a0000, header and runs make 0x7a1000"]),
    "ContextFlags": (_set_context(0x30, "<I", 0x1F),
                     ["header ContextRecord has ContextFlags 0x1f, without CONTEXT_AMD64 (0x100000)"]),
    "MxCsr": (_set_context(0x34, "<I", 0x1F81), ["header ContextRecord has MxCsr 0x1f81 but FltSave.MxCsr 0x1f80"]),
    "FltSave.MxCsr": (_set_context(0x118, "<I", 0), ["header ContextRecord has MxCsr 0x1f80 but FltSave.MxCsr 0x0"]),
    "BugCheckCodePad": (_set("BugCheckCodePad", PAGE_WORD),
                        ["pad after BugCheckCode (header offset 0x3c) is 0x45474150, expected 0"]),
    "PhysicalMemoryBlock.Unused": (_set_block("Unused", 1),
                                   ["pad after PhysicalMemoryBlock.NumberOfRuns (header offset 0x8c) is 0x1, expected 0"]),
    "Exception.Unused": (lambda h: h["Exception"].__setitem__("Unused", 2),
                         ["pad after Exception.NumberParameters (header offset 0xf1c) is 0x2, expected 0"]),
    "DumpTypePad": (_set("DumpTypePad", PAGE_WORD), ["pad after DumpType (header offset 0xf9c) is 0x45474150, expected 0"]),
    "Exception PAGE": (_page_in_exception,
                       ['the exception record still holds the "PAGE" filler at header offset 0xf00, 0xf40']),
    "KdDebuggerDataBlock": (_set("KdDebuggerDataBlock", 0), ["KdDebuggerDataBlock is 0: readers cannot find KDBG"]),
    "SystemUpTime PAGE": (_set("SystemUpTime", PAGE_WORD << 32),
                          ['SystemUpTime (header offset 0x1030) still holds the "PAGE" filler']),
    "SuiteMask PAGE": (_set("SuiteMask", PAGE_WORD), ['SuiteMask (header offset 0x1044) still holds the "PAGE" filler']),
}


@pytest.mark.parametrize("name", HEADER_CORRUPTIONS)
def test_header_corruption_is_reported(tmp_path, guest, name):
    corrupt, problems = HEADER_CORRUPTIONS[name]
    header = sound_header(guest)
    corrupt(header)
    assert verify_dump(write(tmp_path, header, guest)) == problems


def test_the_model_guests_exact_sizes(guest):
    # The numbers HEADER_CORRUPTIONS quotes, from the model's RAM rather than from a dump.
    pages = int(guest.windows_runs()[:, 1].sum())
    assert pages == 0x9F + 0x600 + 0x100 == 1951 and X64.size + pages * 0x1000 == 0x7A1000


@pytest.mark.parametrize("magic, problem", [
    (b"XAGEDU64", "not a Windows dump header: signature b'XAGE', expected b'PAGE'"),
    (b"PAGEDU32", "not a Windows dump header: ValidDump b'DU32', expected b'DU64' or b'DUMP'"),
])
def test_bad_magic(tmp_path, guest, magic, problem):
    path = write(tmp_path, sound_header(guest), guest)
    with open(path, "r+b") as f:
        f.write(magic)
    assert verify_dump(path) == [problem]


def test_file_size(tmp_path, guest):
    path = write(tmp_path, sound_header(guest), guest)
    with open(path, "ab") as f:
        f.write(b"\0")
    assert verify_dump(path) == ["file size is 7999489 bytes, header and runs make 7999488"]
    os.truncate(path, 0x7A0000)
    assert verify_dump(path) == ["file size is 7995392 bytes, header and runs make 7999488"]


RUN_LAYOUTS = {
    "unsorted": ([[0x100, 0x600], [0x1, 0x9F], [0x800, 0x100]],
                 "run 1 (pages 0x1-0x9f, bytes 0x1000-0x9ffff) starts below run 0 (runs must be sorted by BasePage)"),
    "overlapping": ([[0x1, 0x9F], [0x100, 0x600], [0x500, 0x10], [0x800, 0x100]],
                    "run 2 (pages 0x500-0x50f, bytes 0x500000-0x50ffff) overlaps run 1"),
    "empty": ([[0x1, 0x9F], [0xA0, 0x0], [0x100, 0x600], [0x800, 0x100]],
              "run 1 (BasePage 0xa0, PageCount 0) is empty"),
}


@pytest.mark.parametrize("name", RUN_LAYOUTS)
def test_bad_runs_are_reported(tmp_path, guest, name):
    runs, problem = RUN_LAYOUTS[name]
    runs = np.array(runs, dtype=np.uint64)
    # The body follows the header's runs, so the guest memory checks still pass.
    assert verify_dump(write(tmp_path, sound_header(guest, runs), guest, runs=runs)) == [problem]


def test_no_runs(tmp_path, guest):
    runs = np.zeros((0, 2), dtype=np.uint64)
    problems = verify_dump(write(tmp_path, sound_header(guest, runs), guest, runs=runs))
    assert problems[0] == "PhysicalMemoryBlock holds no runs"
    assert problems[1].startswith(f"KDBG at {guest.kdbg_address:#x} is not readable through DirectoryTableBase "
                                  f"{guest.directory_table_base:#x}: ")
    assert len(problems) == 2


def test_kdbg_not_mapped(tmp_path, guest):
    header = sound_header(guest)
    header["KdDebuggerDataBlock"] = guestmodel.KUSER_SHARED_DATA + 0x10000
    [problem] = verify_dump(write(tmp_path, header, guest))
    assert problem.startswith(f"KDBG at {guestmodel.KUSER_SHARED_DATA + 0x10000:#x} is not readable through "
                              f"DirectoryTableBase {guest.directory_table_base:#x}: ")


def test_encoded_kdbg(tmp_path):
    guest = CrashedGuest(ram=RAM, encoded_kdbg=True)
    header = sound_header(guest)
    header["KdDebuggerDataBlock"] = guest.kdbg_address
    tag = guest.read(physical(guest, guest.kdbg_address + 0x10), 4)
    assert tag != b"KDBG"
    assert verify_dump(write(tmp_path, header, guest)) == [
        f"KDBG at {guest.kdbg_address:#x} has OwnerTag {tag!r}, expected b'KDBG' (still encoded?)"
    ]
    header["KdDebuggerDataBlock"] = guest.decoded_kdbg_address
    assert verify_dump(write(tmp_path, header, guest, name="decoded.dmp")) == []


def test_processor_contexts(tmp_path, guest):
    contexts = guest.context_addresses
    patches = {
        physical(guest, contexts[0] + CONTEXT_FLAGS): struct.pack("<I", 0x10001F & ~0x100000),
        physical(guest, contexts[2] + SEG_CS): struct.pack("<H", 0x33),
    }
    assert verify_dump(write(tmp_path, sound_header(guest), guest, patches)) == [
        f"{NO_KERNEL_CONTEXT.format(0)} (CONTEXT at {contexts[0]:#x} has ContextFlags 0x1f, without CONTEXT_AMD64)",
        f"{NO_KERNEL_CONTEXT.format(2)} (CONTEXT at {contexts[2]:#x} has SegCs 0x33, not the kernel's 0x10)",
    ]


def test_processor_without_kprcb_or_context(tmp_path, guest):
    patches = {
        physical(guest, guest.ki_processor_block + 8): bytes(8),
        physical(guest, guest.kprcb_addresses[2] + guestmodel.OFFSET_PRCB_CONTEXT): struct.pack("<Q", 1 << 47),
    }
    problems = verify_dump(write(tmp_path, sound_header(guest), guest, patches))
    assert problems[0] == f"{NO_KERNEL_CONTEXT.format(1)} (its KiProcessorBlock entry is 0)"
    assert problems[1].startswith(f"{NO_KERNEL_CONTEXT.format(2)} (virtual address {1 << 47:#x} does not translate")
    assert len(problems) == 2


def test_message_names_windbgs_symptom():
    assert NO_KERNEL_CONTEXT.format(3) == (
        "processor 3 has no kernel CONTEXT: WinDbg will show 'Only x86 user-mode context is available'"
    )


def test_every_problem_is_reported_not_just_the_first(tmp_path, guest):
    header = sound_header(guest)
    header["RequiredDumpSpace"] = 0
    header["DumpTypePad"] = PAGE_WORD
    patches = {physical(guest, guest.context_addresses[1] + SEG_CS): struct.pack("<H", 0x33)}
    assert verify_dump(write(tmp_path, header, guest, patches)) == [
        "RequiredDumpSpace is 0x0, header and runs make 0x7a1000",
        "pad after DumpType (header offset 0xf9c) is 0x45474150, expected 0",
        f"{NO_KERNEL_CONTEXT.format(1)} (CONTEXT at {guest.context_addresses[1]:#x} has SegCs 0x33, not the kernel's 0x10)",
    ]


def test_x86_dump_header_checks(tmp_path):
    runs = np.array([[0x0, 0xA0], [0x100, 0x300]], dtype=np.uint64)
    header = new_header(X86)
    set_header_runs(header, runs)
    header["DumpType"] = 1
    header["NumberProcessors"] = 1
    header["RequiredDumpSpace"] = X86.size + body_size(runs)
    path = tmp_path / "x86.dmp"
    write_dump(path, header_bytes(header), runs, MemoryGuest())
    assert verify_dump(path) == []
    header["MachineImageType"] = 0x8664
    raw = bytearray(header_bytes(header))
    raw[0x5E] = 1
    with open(path, "r+b") as f:
        f.write(raw)
    assert verify_dump(path) == [
        "MachineImageType is 0x8664, expected 0x14c in a PAGEDUMP dump",
        "pad after KdSecondaryVersion (header offset 0x5e) is 0x1, expected 0",
    ]


def test_describe_dump(tmp_path, guest):
    text = describe_dump(write(tmp_path, sound_header(guest), guest))
    lines = text.splitlines()
    assert "format               x64 (PAGEDU64), MachineImageType 0x8664" in lines
    assert "version              0xf.19041" in lines
    assert "DumpType             1 (full)" in lines
    assert f"DirectoryTableBase   {guest.directory_table_base:#x}" in lines
    assert f"KdDebuggerDataBlock  {guest.kdbg_address:#x}" in lines
    assert "processors           3" in lines
    assert "system time          2024-01-01T00:00:00Z" in lines
    assert "comment              windump test" in lines
    assert "file size            7999488 bytes (7.6 MiB)" in lines
    assert "RequiredDumpSpace    7999488 bytes" in lines
    assert "runs                 3, 1951 pages (7.6 MiB)" in lines
    assert lines[-3].split() == ["0", "0x1", "0x9f", "0x1000-0x9ffff", "636.0", "KiB"]
    assert lines[-1].split() == ["2", "0x800", "0x100", "0x800000-0x8fffff", "1.0", "MiB"]
