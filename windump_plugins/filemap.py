"""Guest physical memory laid out in pieces of one file: the lookup every file-backed source shares.

A file format (a QEMU ELF, a crash dump, a raw image with a RAM map) only says where each piece of
guest memory lies in its file (:class:`FileMapSource` does the rest); :class:`FileMap` answers reads
with ``preadv`` straight into the caller's buffer and tells the writer the file extents so it can
copy them in the kernel. Third-party plugins may use it too.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np

from .errors import SourceError
from .pieces import PieceMap
from .source import FileExtent, MemorySource, check_in_ram


class FileMap:
    """Sorted, disjoint pieces ``[start, end)`` of guest physical memory, each at a file offset.

    ``where`` names the memory in the message of a read outside it (``guest RAM``, ``the dump``).
    """

    def __init__(self, file: BinaryIO, starts: np.ndarray, ends: np.ndarray, offsets: np.ndarray, description: str,
                 where: str = "guest RAM"):
        self.file = file
        self.description = description
        self.where = where
        self._pieces_map = PieceMap(starts, ends)
        self._offsets = np.asarray(offsets, dtype=np.uint64)
        self.ram = self._pieces_map.ram

    def _pieces(self, address: int, length: int) -> list[tuple[int, int]]:
        """``(file offset, length)`` of each piece the range touches, in address order."""
        check_in_ram(self.ram, address, length, self.description, self.where)
        return [(int(self._offsets[index]) + inside, count)
                for index, _, inside, count in self._pieces_map.split(address, length)]

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
