"""The qmp source's parts that need no QEMU: location parsing, the forward-only ELF stream, and its
plugin hooks."""

from __future__ import annotations

import os
import threading

import pytest
from elfmaker import TinyGuest, write_qemu_elf

from windump_plugins.errors import FormatError, SourceError
from windump_plugins.plugins import Plugins
from windump_plugins.sources import qmp
from windump_plugins.live.elfstream import ElfStream
from windump_plugins.sources.qmp import parse_location

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
