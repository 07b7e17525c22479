"""Property-based fuzzing of the ELF, note, dump-header and RSP parsers: whatever the bytes, only
windump's own error escapes, and memory and time stay bounded on hostile sizes."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
import warnings

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from corpus.files import Elf, model_guest, tiny_elf
from windump_plugins.dumpfile import DumpFile
from windump_plugins.formats.elfnotes import cpu_registers, parse_notes, vmcoreinfo_note
from windump_plugins.errors import WindumpError
from windump_plugins.formats.dumpheader import X64, header_runs
from windump_plugins.headers.published import _parse_note
from windump_plugins.live.rsppacket import decode
from windump_plugins.save import save
from windump_plugins.runs import check_runs
from windump_plugins.elffile import ElfSource
from windump_plugins.sources.sample import SampleSource
from windump_plugins.verify import describe_dump, verify_dump

FUZZ = settings(max_examples=150, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

#: Peak Python allocation any parse of a hostile file may reach.
MEMORY_BOUND = 64 << 20
#: Seconds any parse of a hostile file may take.
TIME_BOUND = 5.0


class Bounded:
    """Measures peak traced allocation and wall time of the block, and asserts both bounds."""

    def __init__(self, memory: int = MEMORY_BOUND, seconds: float = TIME_BOUND) -> None:
        self.memory, self.seconds = memory, seconds

    def __enter__(self) -> Bounded:
        tracemalloc.start()
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc_info) -> None:
        self.elapsed = time.monotonic() - self.started
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert self.peak <= self.memory, f"peak allocation {self.peak} bytes"
        assert self.elapsed <= self.seconds, f"took {self.elapsed:.1f} s"


def open_elf(path) -> None:
    try:
        with ElfSource(path) as source:
            source.cpus()
            source.vmcoreinfo()
            if len(source.ram):
                start = int(source.ram[0, 0])
                source.read(start, min(64, int(source.ram[0, 1]) - start))
    except WindumpError:
        pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 0x2800), st.integers(0, 255)), min_size=1, max_size=12))
def test_elf_with_damaged_headers_and_notes(tmp_path_factory, changes):
    data = bytearray(tiny_elf())
    for offset, value in changes:
        data[offset] = value
    path = tmp_path_factory.mktemp("fuzz") / "guest.elf"
    path.write_bytes(data)
    with Bounded():
        open_elf(path)


@FUZZ
@given(st.binary(max_size=0x400))
def test_elf_of_random_bytes(tmp_path_factory, tail):
    path = tmp_path_factory.mktemp("fuzz") / "guest.elf"
    path.write_bytes(b"\x7fELF\x02\x01\x01" + tail)
    with Bounded():
        open_elf(path)


@FUZZ
@given(st.binary(max_size=0x200))
@example(struct.pack("<III", 5, 0xFFFFFFFF, 0) + b"QEMU\0\0\0\0")
@example(struct.pack("<III", 0xFFFFFFFF, 0, 0))
def test_notes_of_random_bytes(segment):
    with Bounded():
        try:
            notes = parse_notes(segment, "fuzz")
            cpu_registers(notes, "fuzz")
            vmcoreinfo_note(notes)
        except WindumpError:
            pass


@FUZZ
@given(st.binary(min_size=0, max_size=64), st.integers(0, 0x2100), st.sampled_from([b"PAGEDU64", b"PAGEDUMP", b"PAGE"]))
def test_dump_header_in_a_note(tail, size, magic):
    note = bytes(24) + (magic + tail * (size // max(len(tail), 1) + 1))[:size]
    with Bounded():
        try:
            _, header = _parse_note(note)
            check_runs(header_runs(header), [[0, 1 << 40]], max_runs=X64.max_runs)
        except WindumpError:
            pass


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([0x08, 0x10, 0x34, 0x88, 0x8C, 0x90, 0x98, 0xA0, 0xA8, 0xF98, 0xFA0,
                                           0xFA8, 0x80, 0x348]),
                          st.integers(0, 2**64 - 1)), min_size=1, max_size=6))
def test_verify_and_info_of_a_damaged_dump_header(tmp_path_factory, changes):
    header = bytearray(b"PAGEDU64" + bytes(X64.size - 8))
    struct.pack_into("<IQQQ", header, 0x88, 1, 2, 1, 2)
    struct.pack_into("<I", header, 0xF98, 1)
    for offset, value in changes:
        struct.pack_into("<Q", header, offset, value)
    path = tmp_path_factory.mktemp("fuzz") / "guest.dmp"
    path.write_bytes(bytes(header) + bytes(0x2000))
    with Bounded():
        assert isinstance(verify_dump(path), list)
        try:
            describe_dump(path)
            DumpFile(path).close()
        except WindumpError:
            pass


@FUZZ
@given(st.binary(max_size=256))
@example(b"}")
@example(b"a*")
def test_rsp_decode_raises_only_source_errors(body):
    try:
        decode(body)
    except WindumpError:
        pass


def _elf_with_loads(path, count: int, *, same_offset: bool, overlap: bool) -> None:
    """An ELF64 core with ``count`` one-page PT_LOADs (all at physical 0 when ``overlap``)."""
    data_offset = 64 + 56 * count
    data_offset += -data_offset % 0x1000
    phdrs = bytearray()
    for i in range(count):
        paddr = 0 if overlap else i << 12
        offset = data_offset if same_offset or overlap and i == 0 else data_offset + (i % 2) * 0x1000
        phdrs += struct.pack("<IIQQQQQQ", 1, 0, offset, paddr, paddr, 0x1000, 0x1000, 0)
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 4, 62, 1, 0, 64, 0, 0, 64, 56, count, 0, 0, 0)
    with open(path, "wb") as out:
        out.write(ehdr + phdrs)
        out.seek(data_offset + 0x2000 - 1)
        out.write(b"\0")


@pytest.mark.parametrize("overlap, same_offset, error", [
    (False, True, None),          # 65535 distinct pages, all read from one file page
    (True, True, None),           # 65535 segments over the same page, agreeing
    (True, False, "puts physical 0x0-0x1000 at file offset"),  # overlapping and disagreeing
])
def test_65535_segments_stay_bounded(tmp_path, overlap, same_offset, error):
    path = tmp_path / "many.elf"
    _elf_with_loads(path, 0xFFFE, same_offset=same_offset, overlap=overlap)
    with Bounded(memory=96 << 20):
        try:
            with ElfSource(path) as source:
                ram = source.ram.copy()
        except WindumpError as caught:
            assert error is not None and error in str(caught)
        else:
            assert error is None
            assert int(ram[-1, 1]) == (0x1000 if overlap else 0xFFFE << 12)


def test_note_claiming_4_gib_stays_bounded(tmp_path):
    elf = Elf(tiny_elf())
    elf.set("<I", elf.notes[0] + 4, 0xFFFFFFFC)
    path = tmp_path / "huge-note.elf"
    path.write_bytes(elf.data)
    with Bounded(memory=16 << 20, seconds=1), pytest.raises(WindumpError, match="4294967292-byte descriptor"):
        ElfSource(path)


def test_verify_of_a_header_claiming_4g_processors_stays_bounded(tmp_path):
    """NumberProcessors 0xffffffff must not make verify read 32 GiB of KiProcessorBlock."""
    path = tmp_path / "model.dmp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save(SampleSource(model_guest()), path)
    with open(path, "r+b") as dump:
        os.pwrite(dump.fileno(), struct.pack("<I", 0xFFFFFFFF), 0x34)
    with Bounded():
        problems = verify_dump(path)
    assert "NumberProcessors is 4294967295, more than the 2048 processors Windows runs on" in problems
