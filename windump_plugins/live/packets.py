"""Guest RAM through the gdbstub itself, in physical-memory mode: the path that works wherever the
stub does (pipelined ``m`` packets on our socket or gdb's, else gdb's ``read_memory``)."""

from __future__ import annotations

from typing import Protocol

from ..pieces import PieceMap
from .layers import RamReader


class MemoryStub(Protocol):
    def readinto(self, address: int, buffer: memoryview) -> None: ...


class PacketRam(RamReader):
    """RAM read with ``m`` requests through ``stub`` (which must be in PhyMemMode 1)."""

    name = "packets"

    def __init__(self, stub: MemoryStub, layout: PieceMap) -> None:
        super().__init__(layout)
        self.stub = stub

    def readinto(self, address: int, view: memoryview) -> None:
        self.stub.readinto(address, view)
