"""The dump header layouts: every offset REFERENCE.md sections 1-2 give, the sizes, and the run helpers."""

import numpy as np
import pytest

from windump_plugins.formats import dumpheader as fmt
from windump_plugins.errors import FormatError


def offset(dtype: np.dtype, path: str) -> int:
    """Byte offset of a dotted field path such as ``PhysicalMemoryBlock.Run``."""
    total = 0
    for name in path.split("."):
        field_dtype, field_offset = dtype.fields[name][:2]
        total += field_offset
        dtype = field_dtype.base if field_dtype.subdtype else field_dtype
    return total


HEADER64_OFFSETS = {
    "Signature": 0x000, "ValidDump": 0x004, "MajorVersion": 0x008, "MinorVersion": 0x00C,
    "DirectoryTableBase": 0x010, "PfnDatabase": 0x018, "PsLoadedModuleList": 0x020,
    "PsActiveProcessHead": 0x028, "MachineImageType": 0x030, "NumberProcessors": 0x034,
    "BugCheckCode": 0x038, "BugCheckCodePad": 0x03C, "BugCheckParameter1": 0x040,
    "BugCheckParameter2": 0x048, "BugCheckParameter3": 0x050, "BugCheckParameter4": 0x058,
    "VersionUser": 0x060, "KdDebuggerDataBlock": 0x080, "PhysicalMemoryBlock": 0x088,
    "PhysicalMemoryBlock.NumberOfRuns": 0x088, "PhysicalMemoryBlock.Unused": 0x08C,
    "PhysicalMemoryBlock.NumberOfPages": 0x090, "PhysicalMemoryBlock.Run": 0x098,
    "ContextRecord": 0x348, "Exception": 0xF00, "Exception.ExceptionCode": 0xF00,
    "Exception.ExceptionFlags": 0xF04, "Exception.ExceptionRecord": 0xF08,
    "Exception.ExceptionAddress": 0xF10, "Exception.NumberParameters": 0xF18,
    "Exception.ExceptionInformation": 0xF20, "DumpType": 0xF98, "RequiredDumpSpace": 0xFA0,
    "SystemTime": 0xFA8, "Comment": 0xFB0, "SystemUpTime": 0x1030, "MiniDumpFields": 0x1038,
    "SecondaryDataState": 0x103C, "ProductType": 0x1040, "SuiteMask": 0x1044,
    "WriterStatus": 0x1048, "KdSecondaryVersion": 0x104D, "Attributes": 0x1050, "BootId": 0x1054,
}

HEADER32_OFFSETS = {
    "Signature": 0x00, "ValidDump": 0x04, "MajorVersion": 0x08, "MinorVersion": 0x0C,
    "DirectoryTableBase": 0x10, "PfnDatabase": 0x14, "PsLoadedModuleList": 0x18,
    "PsActiveProcessHead": 0x1C, "MachineImageType": 0x20, "NumberProcessors": 0x24,
    "BugCheckCode": 0x28, "BugCheckParameter1": 0x2C, "BugCheckParameter4": 0x38,
    "VersionUser": 0x3C, "PaeEnabled": 0x5C, "KdSecondaryVersion": 0x5D,
    "KdDebuggerDataBlock": 0x60, "PhysicalMemoryBlock": 0x64,
    "PhysicalMemoryBlock.NumberOfRuns": 0x64, "PhysicalMemoryBlock.NumberOfPages": 0x68,
    "PhysicalMemoryBlock.Run": 0x6C, "ContextRecord": 0x320, "Exception": 0x7D0,
    "Comment": 0x820, "DumpType": 0xF88, "MiniDumpFields": 0xF8C, "SecondaryDataState": 0xF90,
    "ProductType": 0xF94, "SuiteMask": 0xF98, "WriterStatus": 0xF9C, "RequiredDumpSpace": 0xFA0,
    "SystemUpTime": 0xFB8, "SystemTime": 0xFC0,
}


@pytest.mark.parametrize("path, expected", HEADER64_OFFSETS.items())
def test_header64_offsets(path, expected):
    assert offset(fmt.DUMP_HEADER64, path) == expected


@pytest.mark.parametrize("path, expected", HEADER32_OFFSETS.items())
def test_header32_offsets(path, expected):
    assert offset(fmt.DUMP_HEADER32, path) == expected


def test_sizes_and_limits():
    assert fmt.DUMP_HEADER64.itemsize == fmt.X64.size == 0x2000
    assert fmt.DUMP_HEADER32.itemsize == fmt.X86.size == 0x1000
    assert fmt.EXCEPTION_RECORD64.itemsize == 0x98
    assert fmt.EXCEPTION_RECORD32.itemsize == 0x50
    assert fmt.DUMP_HEADER64.fields["ContextRecord"][0].itemsize == 3000
    assert fmt.DUMP_HEADER32.fields["ContextRecord"][0].itemsize == 1200
    # 42 (x64) and 86 (x86) runs are the most that fit in the 700-byte PhysicalMemoryBlock.
    for descriptor, run, limit in (
        (fmt.PHYSICAL_MEMORY_DESCRIPTOR64, fmt.PHYSICAL_MEMORY_RUN64, fmt.MAX_RUNS64),
        (fmt.PHYSICAL_MEMORY_DESCRIPTOR32, fmt.PHYSICAL_MEMORY_RUN32, fmt.MAX_RUNS32),
    ):
        first_run = descriptor.fields["Run"][1]
        assert first_run + limit * run.itemsize <= 700 < first_run + (limit + 1) * run.itemsize
    assert (fmt.X64.max_runs, fmt.X86.max_runs) == (42, 86)


@pytest.mark.parametrize("header_format", fmt.HEADER_FORMATS, ids=lambda f: f.name)
def test_build_then_parse_round_trips(header_format):
    header = fmt.new_header(header_format)
    runs = np.array([[1, 0x9E], [0x100, 0x3F00], [0x100000, 0x40000]], dtype=np.uint64)
    fmt.set_header_runs(header, runs)
    header["DirectoryTableBase"] = 0x1AA000
    data = fmt.header_bytes(header)

    assert len(data) == header_format.size
    assert data[:8] == b"PAGE" + header_format.valid_dump
    parsed_format, parsed = fmt.parse_header(data + b"body")
    assert parsed_format is header_format
    assert np.array_equal(fmt.header_runs(parsed), runs)
    assert int(parsed["PhysicalMemoryBlock"]["NumberOfPages"]) == 0x9E + 0x3F00 + 0x40000
    assert int(parsed["MachineImageType"]) == header_format.machine
    assert fmt.body_size(runs) == (0x9E + 0x3F00 + 0x40000) * 0x1000


def test_parse_keeps_bytes_between_fields():
    raw = bytearray(b"PAGE" * 0x800)
    raw[4:8] = b"DU64"
    _, header = fmt.parse_header(bytes(raw))
    assert fmt.header_bytes(header) == bytes(raw)


def test_too_many_runs_are_refused():
    header = fmt.new_header()
    with pytest.raises(FormatError, match="43 physical-memory runs do not fit in the header \\(at most 42\\)"):
        fmt.set_header_runs(header, np.ones((43, 2), dtype=np.uint64))
    header["PhysicalMemoryBlock"]["NumberOfRuns"] = 50
    with pytest.raises(FormatError, match="NumberOfRuns is 50, at most 42 fit"):
        fmt.header_runs(header)


@pytest.mark.parametrize("data, message", [
    (b"", "signature b'', expected b'PAGE'"),
    (b"MDMP\x93\xa7\x00\x00", "signature b'MDMP'"),
    (b"PAGEXXXX", "ValidDump b'XXXX', expected b'DU64' or b'DUMP'"),
    (b"PAGEDU64" + bytes(100), "truncated x64 dump header: 108 bytes, expected 0x2000"),
])
def test_bad_headers(data, message):
    with pytest.raises(FormatError, match=message.replace("(", "\\(").replace(")", "\\)")):
        fmt.parse_header(data)
