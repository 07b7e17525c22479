"""The Windows kernel crash dump format: DUMP_HEADER64 and DUMP_HEADER32 as numpy structured dtypes.

A full dump (DumpType 1) is the header followed by the pages of each physical-memory run, packed back
to back in run order. Every layout below is data: a field's offset is ``field_offset(DTYPE, name)`` and
``tests/test_format.py`` pins each one. Field names are those of the Windows headers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError

PAGE_SIZE = 0x1000
PAGE_SHIFT = 12

SIGNATURE = b"PAGE"
VALID_DUMP64 = b"DU64"
VALID_DUMP32 = b"DUMP"

DUMP_TYPE_FULL = 1
DUMP_TYPE_KERNEL = 2
DUMP_TYPE_BITMAP_FULL = 5
DUMP_TYPE_BITMAP_KERNEL = 6

IMAGE_FILE_MACHINE_AMD64 = 0x8664
IMAGE_FILE_MACHINE_I386 = 0x14C

#: Windows fills unused header bytes with this 32-bit pattern; readers have misread fields that
#: still hold it, so windump zeroes it where readers look and verify reports it.
PAGE_FILLER = int.from_bytes(SIGNATURE, "little")

#: Bug-check code QEMU writes when the guest recorded none: the guest was alive when dumped.
LIVE_SYSTEM_DUMP = 0x161


def layout(size: int, fields: list[tuple[int, str, object]]) -> np.dtype:
    """A little-endian structured dtype of ``size`` bytes from ``(offset, name, format)`` rows."""
    offsets, names, formats = zip(*fields)
    return np.dtype({"names": list(names), "formats": list(formats), "offsets": list(offsets), "itemsize": size})


def field_offset(dtype: np.dtype, name: str) -> int:
    """The byte offset of field ``name`` in the structured ``dtype`` (KeyError for no such field)."""
    if dtype.fields is None:
        raise TypeError(f"{dtype} is not a structured dtype")
    return int(dtype.fields[name][1])


PHYSICAL_MEMORY_RUN64 = layout(0x10, [(0x0, "BasePage", "<u8"), (0x8, "PageCount", "<u8")])
PHYSICAL_MEMORY_RUN32 = layout(0x8, [(0x0, "BasePage", "<u4"), (0x4, "PageCount", "<u4")])

#: Runs that fit in the 700 bytes Windows gives PhysicalMemoryBlock (WinDbg truncates past these).
MAX_RUNS64 = 42
MAX_RUNS32 = 86

PHYSICAL_MEMORY_DESCRIPTOR64 = layout(700, [
    (0x00, "NumberOfRuns", "<u4"),
    (0x04, "Unused", "<u4"),
    (0x08, "NumberOfPages", "<u8"),
    (0x10, "Run", (PHYSICAL_MEMORY_RUN64, MAX_RUNS64)),
])

PHYSICAL_MEMORY_DESCRIPTOR32 = layout(700, [
    (0x00, "NumberOfRuns", "<u4"),
    (0x04, "NumberOfPages", "<u4"),
    (0x08, "Run", (PHYSICAL_MEMORY_RUN32, MAX_RUNS32)),
])

EXCEPTION_RECORD64 = layout(0x98, [
    (0x00, "ExceptionCode", "<u4"),
    (0x04, "ExceptionFlags", "<u4"),
    (0x08, "ExceptionRecord", "<u8"),
    (0x10, "ExceptionAddress", "<u8"),
    (0x18, "NumberParameters", "<u4"),
    (0x1C, "Unused", "<u4"),
    (0x20, "ExceptionInformation", ("<u8", 15)),
])

EXCEPTION_RECORD32 = layout(0x50, [
    (0x00, "ExceptionCode", "<u4"),
    (0x04, "ExceptionFlags", "<u4"),
    (0x08, "ExceptionRecord", "<u4"),
    (0x0C, "ExceptionAddress", "<u4"),
    (0x10, "NumberParameters", "<u4"),
    (0x14, "ExceptionInformation", ("<u4", 15)),
])

DUMP_HEADER64 = layout(0x2000, [
    (0x000, "Signature", "S4"),
    (0x004, "ValidDump", "S4"),
    (0x008, "MajorVersion", "<u4"),
    (0x00C, "MinorVersion", "<u4"),
    (0x010, "DirectoryTableBase", "<u8"),
    (0x018, "PfnDatabase", "<u8"),
    (0x020, "PsLoadedModuleList", "<u8"),
    (0x028, "PsActiveProcessHead", "<u8"),
    (0x030, "MachineImageType", "<u4"),
    (0x034, "NumberProcessors", "<u4"),
    (0x038, "BugCheckCode", "<u4"),
    (0x03C, "BugCheckCodePad", "<u4"),
    (0x040, "BugCheckParameter1", "<u8"),
    (0x048, "BugCheckParameter2", "<u8"),
    (0x050, "BugCheckParameter3", "<u8"),
    (0x058, "BugCheckParameter4", "<u8"),
    (0x060, "VersionUser", ("u1", 32)),
    (0x080, "KdDebuggerDataBlock", "<u8"),
    (0x088, "PhysicalMemoryBlock", PHYSICAL_MEMORY_DESCRIPTOR64),
    (0x348, "ContextRecord", ("u1", 3000)),
    (0xF00, "Exception", EXCEPTION_RECORD64),
    (0xF98, "DumpType", "<u4"),
    (0xF9C, "DumpTypePad", "<u4"),
    (0xFA0, "RequiredDumpSpace", "<u8"),
    (0xFA8, "SystemTime", "<u8"),
    (0xFB0, "Comment", "S128"),
    (0x1030, "SystemUpTime", "<u8"),
    (0x1038, "MiniDumpFields", "<u4"),
    (0x103C, "SecondaryDataState", "<u4"),
    (0x1040, "ProductType", "<u4"),
    (0x1044, "SuiteMask", "<u4"),
    (0x1048, "WriterStatus", "<u4"),
    (0x104C, "Unused1", "u1"),
    (0x104D, "KdSecondaryVersion", "u1"),
    (0x104E, "Unused2", ("u1", 2)),
    (0x1050, "Attributes", "<u4"),
    (0x1054, "BootId", "<u4"),
])

DUMP_HEADER32 = layout(0x1000, [
    (0x000, "Signature", "S4"),
    (0x004, "ValidDump", "S4"),
    (0x008, "MajorVersion", "<u4"),
    (0x00C, "MinorVersion", "<u4"),
    (0x010, "DirectoryTableBase", "<u4"),
    (0x014, "PfnDatabase", "<u4"),
    (0x018, "PsLoadedModuleList", "<u4"),
    (0x01C, "PsActiveProcessHead", "<u4"),
    (0x020, "MachineImageType", "<u4"),
    (0x024, "NumberProcessors", "<u4"),
    (0x028, "BugCheckCode", "<u4"),
    (0x02C, "BugCheckParameter1", "<u4"),
    (0x030, "BugCheckParameter2", "<u4"),
    (0x034, "BugCheckParameter3", "<u4"),
    (0x038, "BugCheckParameter4", "<u4"),
    (0x03C, "VersionUser", ("u1", 32)),
    (0x05C, "PaeEnabled", "u1"),
    (0x05D, "KdSecondaryVersion", "u1"),
    (0x060, "KdDebuggerDataBlock", "<u4"),
    (0x064, "PhysicalMemoryBlock", PHYSICAL_MEMORY_DESCRIPTOR32),
    (0x320, "ContextRecord", ("u1", 1200)),
    (0x7D0, "Exception", EXCEPTION_RECORD32),
    (0x820, "Comment", "S128"),
    (0xF88, "DumpType", "<u4"),
    (0xF8C, "MiniDumpFields", "<u4"),
    (0xF90, "SecondaryDataState", "<u4"),
    (0xF94, "ProductType", "<u4"),
    (0xF98, "SuiteMask", "<u4"),
    (0xF9C, "WriterStatus", "<u4"),
    (0xFA0, "RequiredDumpSpace", "<u8"),
    (0xFB8, "SystemUpTime", "<u8"),
    (0xFC0, "SystemTime", "<u8"),
])


@dataclass(frozen=True)
class HeaderFormat:
    """What differs between the 64-bit and the 32-bit dump: layout, magic, limits, machine."""

    name: str
    dtype: np.dtype
    valid_dump: bytes
    max_runs: int
    machine: int

    @property
    def size(self) -> int:
        """Header bytes; the body (the first page of Run[0]) starts right after them."""
        return self.dtype.itemsize


X64 = HeaderFormat("x64", DUMP_HEADER64, VALID_DUMP64, MAX_RUNS64, IMAGE_FILE_MACHINE_AMD64)
X86 = HeaderFormat("x86", DUMP_HEADER32, VALID_DUMP32, MAX_RUNS32, IMAGE_FILE_MACHINE_I386)
HEADER_FORMATS = (X64, X86)


def header_format(data: bytes) -> HeaderFormat:
    """The format whose ``PAGE``/``DU64`` or ``PAGE``/``DUMP`` magic opens ``data``."""
    if len(data) < 8 or data[:4] != SIGNATURE:
        raise FormatError(f"not a Windows dump header: signature {bytes(data[:4])!r}, expected b'PAGE'")
    for fmt in HEADER_FORMATS:
        if data[4:8] == fmt.valid_dump:
            return fmt
    raise FormatError(f"not a Windows dump header: ValidDump {bytes(data[4:8])!r}, expected b'DU64' or b'DUMP'")


def parse_header(data: bytes) -> tuple[HeaderFormat, np.ndarray]:
    """A writable copy of the header at the start of ``data`` (a 0-d structured array), with its format."""
    fmt = header_format(data)
    if len(data) < fmt.size:
        raise FormatError(f"truncated {fmt.name} dump header: {len(data)} bytes, expected {fmt.size:#x}")
    # From a bytearray, not .copy(): copying a structured array drops the bytes between its fields.
    return fmt, np.frombuffer(bytearray(data[: fmt.size]), dtype=fmt.dtype).reshape(())


def new_header(fmt: HeaderFormat = X64) -> np.ndarray:
    """A zeroed header with its magic and machine set: zero, not Windows' "PAGE" filler, since
    readers have misread fields left holding that pattern."""
    header = np.zeros((), dtype=fmt.dtype)
    header["Signature"] = SIGNATURE
    header["ValidDump"] = fmt.valid_dump
    header["MachineImageType"] = fmt.machine
    return header


def header_runs(header: np.ndarray) -> np.ndarray:
    """The header's physical-memory runs as an ``(N, 2)`` uint64 array of ``[BasePage, PageCount]``.

    Raises FormatError when NumberOfRuns exceeds what the descriptor holds.
    """
    block = header["PhysicalMemoryBlock"]
    count = int(block["NumberOfRuns"])
    capacity = block["Run"].shape[0]
    if count > capacity:
        raise FormatError(f"PhysicalMemoryBlock.NumberOfRuns is {count}, at most {capacity} fit in the header")
    runs = block["Run"][:count]
    return np.stack([runs["BasePage"], runs["PageCount"]], axis=1).astype(np.uint64).reshape(count, 2)


def set_header_runs(header: np.ndarray, runs: np.ndarray) -> None:
    """Store ``(N, 2)`` ``[BasePage, PageCount]`` runs, NumberOfRuns and NumberOfPages; unused slots
    are zeroed."""
    runs = np.asarray(runs, dtype=np.uint64).reshape(-1, 2)
    block = header["PhysicalMemoryBlock"]
    capacity = block["Run"].shape[0]
    if len(runs) > capacity:
        raise FormatError(f"{len(runs)} physical-memory runs do not fit in the header (at most {capacity})")
    block["Run"] = 0
    block["Run"]["BasePage"][: len(runs)] = runs[:, 0]
    block["Run"]["PageCount"][: len(runs)] = runs[:, 1]
    block["NumberOfRuns"] = len(runs)
    block["NumberOfPages"] = int(runs[:, 1].sum())


def body_size(runs: np.ndarray) -> int:
    """Bytes of the dump body for these runs: every page of every run."""
    return int(np.asarray(runs, dtype=np.uint64).reshape(-1, 2)[:, 1].sum()) * PAGE_SIZE


def header_bytes(header: np.ndarray) -> bytes:
    """The header exactly as it goes into the file."""
    return header.tobytes()
