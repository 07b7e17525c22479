"""DumpFile: a full dump read back as guest physical memory, and its errors for files it cannot read."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from test_writer import RAM, RUNS, FileGuest, MemoryGuest, dump_header

from windump_plugins.dumpfile import DumpFile, run_segments
from windump_plugins.errors import FormatError, SourceError
from windump_plugins.formats.dumpheader import PAGE_SIZE, X64, X86, header_bytes, new_header, set_header_runs
from windump_plugins.writer import write_dump

#: Runs out of address order, with two that touch and a lone page: the body packs them as given.
ODD_RUNS = np.array([[0x180, 0x20], [0x0, 0x10], [0x10, 0x8], [0x9F, 0x1], [0x100, 0x10]], dtype=np.uint64)


def written_dump(tmp_path, runs=ODD_RUNS, fmt=X64, guest=None):
    guest = guest or MemoryGuest()
    path = tmp_path / "guest.dmp"
    write_dump(path, dump_header(runs, fmt), runs, guest)
    return path, guest


@pytest.mark.parametrize("fmt", [X64, X86])
def test_reads_back_every_page_at_its_physical_address(tmp_path, fmt):
    path, guest = written_dump(tmp_path, fmt=fmt)
    with DumpFile(path) as dump:
        assert dump.format is fmt
        assert dump.header.tobytes() == dump_header(ODD_RUNS, fmt)
        assert (dump.runs == ODD_RUNS).all()
        assert dump.ram.tolist() == [[0x0, 0x18000], [0x9F000, 0xA0000], [0x100000, 0x110000], [0x180000, 0x1A0000]]
        for start, end in dump.ram.tolist():
            assert dump.read(start, end - start) == bytes(guest.memory[start:end])
        # Across the two touching runs, which lie apart in the file.
        assert dump.read(0xF800, 0x1000) == bytes(guest.memory[0xF800:0x10800])


def test_outside_the_runs_is_a_source_error(tmp_path):
    path, _ = written_dump(tmp_path)
    with DumpFile(path) as dump:
        for address, length in [(0x18000, 1), (0x17FFF, 2), (0x9E000, 0x1001), (0x1A0000, 0x1000)]:
            with pytest.raises(SourceError, match=rf"^dump:{path}: physical range {address:#x}-{address + length:#x} is not in the dump$"):
                dump.read(address, length)


def test_file_extents_locate_pages_in_the_packed_body(tmp_path):
    path, _ = written_dump(tmp_path)
    with DumpFile(path) as dump:
        # Run order: 0x180 (0x20 pages), 0x0 (0x10), 0x10 (8), 0x9F, 0x100.
        extents = dump.file_extents(0xF000, 0x2000)
        assert [(e.offset, e.length) for e in extents] == [
            (X64.size + (0x20 + 0xF) * PAGE_SIZE, 0x1000),
            (X64.size + 0x30 * PAGE_SIZE, 0x1000),
        ]
        assert extents[0].file.fileno() >= 0


def test_copying_a_dump_goes_through_file_extents(tmp_path):
    guest = FileGuest(tmp_path / "ram.bin")
    path, _ = written_dump(tmp_path, RUNS, guest=guest)
    guest.close()
    copy = tmp_path / "copy.dmp"
    with DumpFile(path) as dump:
        write_dump(copy, dump.header.tobytes(), dump.runs, dump)
    assert copy.read_bytes() == path.read_bytes()


def test_overlapping_runs_are_served_by_the_lower_run():
    starts, ends, offsets = run_segments(np.array([[0x10, 4], [0x0, 0x12], [0x11, 1]], dtype=np.uint64), 0x2000)
    assert starts.tolist() == [0x0, 0x12000]
    assert ends.tolist() == [0x12000, 0x14000]
    assert offsets.tolist() == [0x2000 + 4 * PAGE_SIZE, 0x2000 + 2 * PAGE_SIZE]


def test_not_a_dump(tmp_path):
    path = tmp_path / "guest.elf"
    path.write_bytes(b"\x7fELF" + bytes(0x3000))
    with pytest.raises(FormatError, match=rf"^{path}: not a Windows dump header: signature b'\\x7fELF', expected b'PAGE'$"):
        DumpFile(path)


def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match=rf"^cannot open {tmp_path}/absent.dmp: No such file or directory$"):
        DumpFile(tmp_path / "absent.dmp")


def test_truncated_dump(tmp_path):
    path, _ = written_dump(tmp_path)
    size = path.stat().st_size
    os.truncate(path, size - 1)
    with pytest.raises(FormatError, match=rf"^{path}: truncated dump, {size - 1} bytes where header and runs need {size}$"):
        DumpFile(path)
    os.truncate(path, 0x1000)
    with pytest.raises(FormatError, match=rf"^{path}: truncated x64 dump header: 4096 bytes, expected 0x2000$"):
        DumpFile(path)


@pytest.mark.parametrize("dump_type, reason", [
    (5, "DumpType 5 (bitmap) is not supported yet"),
    (2, "DumpType 2 is not supported (windump reads full dumps, DumpType 1)"),
])
def test_dump_types_it_does_not_read(tmp_path, dump_type, reason):
    header = new_header()
    set_header_runs(header, RUNS)
    header["DumpType"] = dump_type
    path = tmp_path / "guest.dmp"
    write_dump(path, header_bytes(header), RUNS, MemoryGuest(RAM))
    with pytest.raises(FormatError, match=rf"^{re.escape(f'{path}: {reason}')}$"):
        DumpFile(path)
