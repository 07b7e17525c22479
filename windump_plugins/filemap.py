"""Guest physical memory laid out in pieces of one file: the lookup every file-backed source shares.

A file format (a QEMU ELF, a raw image with a RAM map) only says where each piece of guest memory
lies in its file (:class:`FileMapSource` does the rest); :class:`FileMap` answers reads with ``preadv`` straight into the caller's buffer
and tells the writer the file extents so it can copy them in the kernel. Third-party plugins may use
it too.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np

from .errors import SourceError
from .source import FileExtent, MemorySource, check_in_ram


class FileMap:
    """Sorted, disjoint pieces ``[start, end)`` of guest physical memory, each at a file offset."""

    def __init__(self, file: BinaryIO, starts: np.ndarray, ends: np.ndarray, offsets: np.ndarray, description: str):
        self.file = file
        self.description = description
        self._starts = np.asarray(starts, dtype=np.uint64)
        self._ends = np.asarray(ends, dtype=np.uint64)
        self._offsets = np.asarray(offsets, dtype=np.uint64)
        # RAM ranges: pieces that touch in guest-physical space read as one range.
        joins = np.flatnonzero(self._starts[1:] != self._ends[:-1]) + 1
        ram = np.stack([self._starts[np.r_[0, joins]], self._ends[np.r_[joins - 1, -1]]], axis=1)
        ram.flags.writeable = False
        self.ram = ram

    def _pieces(self, address: int, length: int) -> list[tuple[int, int]]:
        """``(file offset, length)`` of each piece the range touches, in address order."""
        check_in_ram(self.ram, address, length, self.description)
        i = int(np.searchsorted(self._starts, np.uint64(address), side="right")) - 1
        pieces = []
        while length > 0:
            n = min(length, int(self._ends[i]) - address)
            pieces.append((int(self._offsets[i]) + address - int(self._starts[i]), n))
            address, length, i = address + n, length - n, i + 1
        return pieces

    def extents(self, address: int, length: int) -> list[FileExtent]:
        """Where the range lies in the file, piece by piece."""
        return [FileExtent(self.file, offset, n) for offset, n in self._pieces(address, length)]

    def readinto(self, address: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from the file; SourceError outside RAM or where the file ends too soon."""
        view = memoryview(buffer).cast("B")
        position = 0
        for offset, length in self._pieces(address, len(view)):
            done = 0
            while done < length:
                n = os.preadv(self.file.fileno(), [view[position + done:position + length]], offset + done)
                if n == 0:
                    raise SourceError(f"{self.description}: the file ended at offset {offset + done:#x} while "
                                      f"reading physical {address:#x}-{address + len(view):#x} (was it truncated?)")
                done += n
            position += length


class FileMapSource(MemorySource):
    """A memory source whose RAM is a :class:`FileMap`: subclasses set ``self.memory`` and add notes,
    registers and ``close``."""

    memory: FileMap

    @property
    def ram(self) -> np.ndarray:
        return self.memory.ram

    def readinto(self, address: int, buffer: memoryview) -> None:
        self.memory.readinto(address, buffer)

    def file_extents(self, address: int, length: int) -> list[FileExtent]:
        return self.memory.extents(address, length)
