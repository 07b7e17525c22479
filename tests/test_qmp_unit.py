"""The qmp source without QEMU: location parsing, the forward-only ELF stream, its plugin hooks, and
each memory path against a stand-in QEMU (``tests/qmpfake.py``)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading

import numpy as np
import pytest
from elfmaker import TinyGuest, note, write_qemu_elf
from qmpfake import FakeQemu

from windump_plugins.elffile import ElfSource
from windump_plugins.errors import FormatError, SourceError
from windump_plugins.formats.dumpheader import DUMP_HEADER64
from windump_plugins.guest.model import CrashedGuest
from windump_plugins.live.elfstream import ElfStream
from windump_plugins.plugins import Plugins
from windump_plugins.save import save
from windump_plugins.source import Access
from windump_plugins.sources import qmp
from windump_plugins.sources.qmp import QmpSource, parse_location


@pytest.mark.parametrize("location, expected", [
    ("qmp:/run/qemu/win.sock", {"address": "/run/qemu/win.sock", "memory": None, "timeout": 10.0}),
    ("qmp:win.sock?memory=stream&timeout=2.5", {"address": "win.sock", "memory": "stream", "timeout": 2.5}),
    ("qmp://127.0.0.1:4444", {"address": ("127.0.0.1", 4444), "memory": None, "timeout": 10.0}),
    ("qmp://[::1]:4444?memory=shm", {"address": ("::1", 4444), "memory": "shm", "timeout": 10.0}),
    ("gdb://127.0.0.1:1234", None),
])
def test_parse_location(location, expected):
    assert parse_location(location) == expected


@pytest.mark.parametrize("location, message", [
    ("qmp:", "expected qmp:PATH"),
    ("qmp://host", "expected qmp:PATH"),
    ("qmp://host:port", "expected qmp:PATH"),
    ("qmp:x.sock?speed=1", "unknown option 'speed'"),
    ("qmp:x.sock?memory=disk", "memory='disk' is none of shm, procmem, stream"),
    ("qmp:x.sock?timeout=soon", "bad option value"),
])
def test_parse_location_errors(location, message):
    with pytest.raises(SourceError, match=message):
        parse_location(location)


@pytest.fixture
def elf_pipe(tmp_path):
    """A QEMU-style ELF of a small guest fed through a pipe by a thread: (read end, guest)."""
    guest = TinyGuest([(0, 0xA0000), (0x100000, 0x400000), (0x100000000, 0x100200000)], seed=7)
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, guest, vmcoreinfo=b"")
    data = path.read_bytes()
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        try:
            os.write(write_fd, data)
        except BrokenPipeError:
            pass
        finally:
            os.close(write_fd)

    thread = threading.Thread(target=feed)
    thread.start()
    yield read_fd, guest, len(data)
    thread.join()


def test_stream_serves_ranges_in_physical_order(elf_pipe):
    read_fd, guest, size = elf_pipe
    stream = ElfStream(read_fd, "test")
    try:
        for address, length in ((0x1000, 0x9F000), (0x200000, 0x1000), (0x3FF000, 0x1000), (0x100001000, 0x100000)):
            buffer = bytearray(length)
            stream.readinto(address, memoryview(buffer))
            assert buffer == guest.read(address, length), hex(address)
        stream.drain()
        assert stream.position == size
    finally:
        stream.close()


def test_stream_cannot_go_back(elf_pipe):
    read_fd, _, _ = elf_pipe
    stream = ElfStream(read_fd, "test")
    try:
        stream.readinto(0x200000, memoryview(bytearray(0x1000)))
        with pytest.raises(SourceError, match="0x1000 is not ahead"):
            stream.readinto(0x1000, memoryview(bytearray(0x1000)))
        with pytest.raises(SourceError, match="0x200800 is not ahead"):
            stream.readinto(0x201000 - 0x800, memoryview(bytearray(0x1000)))
        stream.drain()
    finally:
        stream.close()


def test_stream_that_ends_early(tmp_path):
    """A stream cut short (QEMU gone) fails with one line that says so."""
    guest = TinyGuest([(0, 0x100000)], seed=3)
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, guest, vmcoreinfo=b"")
    read_fd, write_fd = os.pipe()
    os.write(write_fd, path.read_bytes()[:0x8000])
    os.close(write_fd)
    stream = ElfStream(read_fd, "qmp:x")
    try:
        with pytest.raises(SourceError, match="stream ended at byte .*did QEMU quit"):
            stream.readinto(0x10000, memoryview(bytearray(0x1000)))
    finally:
        stream.close()


def test_stream_that_is_not_elf():
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"makedumpfile\0\0\0\0")
    os.close(write_fd)
    with pytest.raises(FormatError, match="dump stream: not an ELF file"):
        ElfStream(read_fd, "qmp:x")


def test_hooks_claim_only_qmp_locations(tmp_path):
    """qmp: locations reach QmpSource, others pass by."""
    plugins = Plugins()
    plugins.register(qmp, "qmp")
    assert [kind.pattern.split()[0] for kind in plugins.kinds()] == ["qmp:PATH"]
    with pytest.raises(SourceError, match="no socket at"):
        plugins.open_source(f"qmp:{tmp_path}/absent.sock")
    assert qmp.windump_open_location("sample:") is None


# --- the source against a stand-in QEMU (tests/qmpfake.py) ---------------------------------------

#: A VMCOREINFO note record as the guest driver publishes it (the dump header is not parsed here).
VMCOREINFO = note(b"VMCOREINFO", 0, b"PAGEDU64".ljust(0x2000, b"\x5a"))
RAM = [(0, 0xA0000), (0x100000, 0x800000)]


@pytest.fixture
def fake_qemu(tmp_path):
    """Start a FakeQemu of a guest with :data:`RAM` (options as FakeQemu takes them): (qemu, guest)."""
    started = []

    def start(**options):
        guest = TinyGuest(RAM, seed=11, note=VMCOREINFO)
        directory = tmp_path / f"qemu{len(started)}"
        directory.mkdir()
        started.append(FakeQemu(directory, guest, **options))
        return started[-1], guest

    yield start
    for qemu in started:
        qemu.close()


def read_all(source, guest) -> None:
    """Read all of RAM as the dump writer does (ascending, 1 MiB at a time) and compare."""
    buffer = bytearray(1 << 20)
    for start, end in source.ram.tolist():
        for address in range(start, end, len(buffer)):
            view = memoryview(buffer)[:min(len(buffer), end - address)]
            source.readinto(address, view)
            assert view == guest.read(address, len(view)), hex(address)


def test_reads_before_the_body_across_pages_come_from_small_elfs(fake_qemu):
    """A read before the body that spans two pages (a KDBG crossing a page boundary) is answered by
    a small ELF of both pages, so a later, lower read still works; QEMU's dump streams only for
    the body, from its first long read."""
    qemu, guest = fake_qemu()
    with QmpSource(qemu.path, memory="stream") as source:
        for address, length in ((0x200FE0, 0x340), (0x150008, 8), (0x201010, 0x10), (0x9F800, 0x800)):
            assert source.read(address, length) == guest.read(address, length), hex(address)
        assert [dump["begin"] for dump in qemu.dumps] == [0, 0x200000, 0x150000, 0x9F000]
        assert [dump["length"] for dump in qemu.dumps] == [0x1000, 0x2000, 0x1000, 0x1000]
        read_all(source, guest)
        source.reading_done()
        assert qemu.dumps[4:] == [{"begin": None, "length": None, "detach": True}]
        assert source.access() == Access("stream", {"shm": "not tried: stream was asked for",
                                                    "procmem": "not tried: stream was asked for"}, 0.0)
    assert qemu.commands.count("closefd") == 0 and qemu.commands.count("getfd") == len(qemu.dumps)


def test_same_host_path_reads_qemu_process_memory(fake_qemu):
    """Without a shared backend, QEMU's process memory serves (checked against the note ELF's page),
    and the access summary says why shm was passed over."""
    qemu, guest = fake_qemu()
    with QmpSource(qemu.path) as source:
        assert source.access() == Access("procmem", {
            "shm": "no memory-backend-file RAM backend (see -object memory-backend-file,share=on)"}, 0.0)
        assert source.qemu_pid == os.getpid()  # SO_PEERCRED: the stand-in lives in this process
        read_all(source, guest)
        assert source.file_extents(0x100000, 0x1000) is None
    assert len(qemu.dumps) == 1  # the note ELF only


def test_process_memory_that_differs_is_passed_over(fake_qemu, monkeypatch):
    qemu, guest = fake_qemu()
    answer = FakeQemu._human_monitor_command

    def next_page(self, connection, **arguments):  # gpa2hva names the page after the one asked
        line = arguments["command-line"]
        if line.startswith("gpa2hva "):
            arguments = {"command-line": f"gpa2hva {int(line.split()[1], 16) + 0x1000:#x}"}
        return answer(self, connection, **arguments)

    monkeypatch.setattr(FakeQemu, "_human_monitor_command", next_page)
    with QmpSource(qemu.path) as source:
        access = source.access()
        assert access.path == "stream"
        assert access.passed_over["procmem"] == "the first page at 0x0 differs from QEMU's own dump of it"
        read_all(source, guest)
    with pytest.raises(SourceError, match="cannot read guest RAM through procmem: the first page at 0x0 differs"):
        QmpSource(qemu.path, memory="procmem")


def test_shared_backend_is_mapped_and_copied_in_the_kernel(fake_qemu):
    qemu, guest = fake_qemu(shared=True)
    with QmpSource(qemu.path) as source:
        assert source.access() == Access("shm", {}, 0.0)
        read_all(source, guest)
        for address, length, offset in ((0x9F000, 0x1000, 0x9F000), (0x100000, 0x2000, 0xA0000)):
            [extent] = source.file_extents(address, length)
            assert (extent.file.name, extent.offset, extent.length) == (str(qemu.mem_path), offset, length)
            assert os.pread(extent.file.fileno(), length, offset) == guest.read(address, length)
    with QmpSource(qemu.path, memory="procmem") as source:
        assert source.access().passed_over == {"shm": "not tried: procmem was asked for"}


def test_running_guest_is_paused_only_until_reading_is_done(fake_qemu):
    qemu, guest = fake_qemu(running=True)
    with QmpSource(qemu.path, memory="stream") as source:
        assert not qemu.running and source.qmp.was_running
        read_all(source, guest)
        source.reading_done()
        assert qemu.running
        paused = source.access().paused_seconds
        assert 0 < paused == source.qmp.paused_seconds
        assert qemu.commands.count("cont") == 1
    assert qemu.commands.count("cont") == 1


@pytest.mark.parametrize("memory", ["shm", "procmem", "stream"])
def test_dump_through_each_path_equals_the_dump_of_the_elf(tmp_path, memory):
    """The model guest saved through the stand-in QEMU, by each memory path, gives the dump its ELF
    gives (but for the Comment naming the source), and its RAM is left unwritten."""
    model = CrashedGuest()
    elf = tmp_path / "guest.elf"
    write_qemu_elf(elf, model)
    with ElfSource(elf) as source:
        save(source, tmp_path / "elf.dmp")
    qemu = FakeQemu(tmp_path, model, shared=memory == "shm")
    before = hashlib.sha256(qemu.memory.buffer).digest()
    try:
        with QmpSource(qemu.path, memory=memory) as source:
            report = save(source, tmp_path / "qmp.dmp")
        assert hashlib.sha256(qemu.memory.buffer).digest() == before
    finally:
        qemu.close()
    assert report.access.path == memory
    ours, theirs = (np.fromfile(tmp_path / name, dtype=np.uint8) for name in ("qmp.dmp", "elf.dmp"))
    comment = slice(DUMP_HEADER64.fields["Comment"][1], DUMP_HEADER64.fields["Comment"][1] + 128)
    ours[comment] = theirs[comment] = 0
    assert ours.size == theirs.size and np.array_equal(ours, theirs)


def test_the_log_names_the_path_and_why_faster_ones_were_passed_over(fake_qemu, caplog):
    qemu, _ = fake_qemu()
    with caplog.at_level(logging.INFO, logger="windump_plugins.live"), QmpSource(qemu.path) as source:
        pass
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert messages == [f"{source.description}: shm passed over: no memory-backend-file RAM backend "
                        "(see -object memory-backend-file,share=on)",
                        f"{source.description}: guest RAM through procmem"]
