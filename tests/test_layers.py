"""Live memory paths as layers: the declared order, forcing a path, and the same-host path both live
sources share, read here from this very process (whose memory stands in for QEMU's)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from windump_plugins.errors import SourceError
from windump_plugins.live.hmp import RamRegion, ram_layout
from windump_plugins.live.layers import PathUnavailable, RamReader, open_first
from windump_plugins.live.samehost import same_host_ram


class Bytes(RamReader):
    """A reader of one bytes object at physical 0, named as asked."""

    def __init__(self, name: str, data: bytes) -> None:
        super().__init__(ram_layout([RamRegion(0, len(data), "test", 0)]))
        self.name = name  # type: ignore[misc]
        self.data = data

    def readinto(self, address: int, view: memoryview) -> None:
        view[:] = self.data[address:address + len(view)]


def unavailable(why: str):
    def open_reader() -> RamReader:
        raise PathUnavailable(why)
    return open_reader


def test_the_first_path_that_opens_serves_and_the_faster_ones_say_why_not(caplog):
    tried = []

    def opening(name: str):
        def open_reader() -> RamReader:
            tried.append(name)
            return Bytes(name, b"x" * 16)
        return open_reader

    paths = [("shm", unavailable("no backend")), ("procmem", opening("procmem")), ("stream", opening("stream"))]
    with caplog.at_level(logging.INFO, logger="windump_plugins.live"):
        reader, passed_over = open_first(paths, forced=None, description="test")
    assert (reader.name, passed_over, tried) == ("procmem", {"shm": "no backend"}, ["procmem"])
    assert [record.getMessage() for record in caplog.records] == [
        "test: shm passed over: no backend", "test: guest RAM through procmem"]


def test_a_forced_path_is_the_only_one_tried():
    paths = [("shm", unavailable("never tried")), ("procmem", unavailable("no rights")),
             ("stream", lambda: Bytes("stream", b""))]
    reader, passed_over = open_first(paths, forced="stream", description="test")
    assert reader.name == "stream"
    assert passed_over == {"shm": "not tried: stream was asked for", "procmem": "not tried: stream was asked for"}
    with pytest.raises(SourceError, match=r"^test: cannot read guest RAM through procmem: no rights$"):
        open_first(paths, forced="procmem", description="test")


def test_when_no_path_opens_the_last_reason_is_the_error():
    paths = [("procmem", unavailable("not local")), ("packets", unavailable("no stub"))]
    with pytest.raises(SourceError, match=r"^test: cannot read guest RAM through packets: no stub$"):
        open_first(paths, forced=None, description="test")


# --- the same-host path, over this process's memory ---------------------------------------------

REGIONS = [RamRegion(0, 0x3000, "pc.ram", 0), RamRegion(0x100000, 0x104000, "pc.ram", 0x3000)]


@pytest.fixture
def guest_ram():
    """Two RAM regions in one buffer of this process, and HMP ``gpa2hva`` answering for it."""
    buffer = np.frombuffer(os.urandom(0x7000), dtype=np.uint8).copy()

    def physical(address: int) -> int:
        region = next(r for r in REGIONS if r.start <= address < r.end)
        return region.offset + address - region.start

    def monitor(command: str) -> str:
        address = int(command.split()[1], 16)
        return f"Host virtual address for {address:#x} (pc.ram) is {buffer.ctypes.data + physical(address):#x}\r\n"

    def read(address: int, length: int) -> bytes:
        return buffer[physical(address):physical(address) + length].tobytes()

    return buffer, monitor, read


def test_same_host_ram_reads_each_region_at_its_host_address(guest_ram):
    buffer, monitor, read = guest_ram
    reader = same_host_ram(os.getpid(), REGIONS, monitor, trusted=read, whose="the test's", description="test")
    try:
        assert reader.name == "procmem" and reader.ram.tolist() == [[0, 0x3000], [0x100000, 0x104000]]
        for address, length in ((0x0FF0, 0x2010), (0x100FF8, 0x3008)):
            view = memoryview(bytearray(length))
            reader.readinto(address, view)
            assert view == read(address, length)
    finally:
        reader.close()


def test_same_host_ram_is_passed_over_when_its_first_page_differs_or_gpa2hva_fails(guest_ram):
    buffer, monitor, read = guest_ram
    with pytest.raises(PathUnavailable, match=r"^the first page at 0x0 differs from the test's$"):
        same_host_ram(os.getpid(), REGIONS, monitor, trusted=lambda address, length: bytes(length),
                      whose="the test's", description="test")
    with pytest.raises(PathUnavailable, match=r"^gpa2hva gives no host address for pc\.ram at 0x100000$"):
        same_host_ram(os.getpid(), REGIONS, lambda command: "" if "0x100000" in command else monitor(command),
                      trusted=read, whose="the test's", description="test")
    with pytest.raises(PathUnavailable, match=r"^cannot open the memory of process"):
        same_host_ram(2 ** 22 + 1, REGIONS, monitor, trusted=read, whose="the test's", description="test")
