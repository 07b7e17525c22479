"""What the live sources read from QEMU's human monitor (HMP): the guest's RAM map (``info mtree
-f``), reads split along it, and where QEMU keeps guest RAM in its own address space (``gpa2hva``)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from .errors import SourceError
from .runs import merge_ranges

_FLATVIEW_ENTRY = re.compile(r"^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ram\): (\S+)(?: @([0-9a-f]+))?", re.M)
_HOST_ADDRESS = re.compile(r"Host virtual address for 0x[0-9a-f]+ \(.*\) is (0x[0-9a-f]+)")


class RamRegion(NamedTuple):
    """A guest-physical RAM range of ``info mtree -f``: ``offset`` bytes into RAM block ``block``."""

    start: int
    end: int
    block: str
    offset: int


def parse_ram_map(text: str) -> list[RamRegion]:
    """The RAM ranges of address space "memory" in ``info mtree -f``, sorted, ``end`` exclusive.

    ROM, ROM devices, RAM devices and I/O are left out: reading MMIO has side effects, and a
    gdbstub in PhyMemMode answers even there, so whatever is called RAM here is trusted.
    """
    for view in re.split(r"^FlatView #\d+\n", text, flags=re.M):
        if re.search(r'^ AS "memory",', view, flags=re.M):
            return [RamRegion(int(start, 16), int(last, 16) + 1, block, int(offset or "0", 16))
                    for start, last, block, offset in _FLATVIEW_ENTRY.findall(view)]
    raise SourceError('"info mtree -f" shows no flat view of address space "memory"')


class RamLayout:
    """Guest RAM as sorted regions, each read its own way: the merged RAM ranges a source reports,
    and reads split where one region ends."""

    def __init__(self, regions: Sequence[RamRegion]):
        self.regions = list(regions)
        self._starts = np.array([region.start for region in self.regions], dtype=np.uint64)
        self._ends = np.array([region.end for region in self.regions], dtype=np.uint64)
        #: ``(N, 2)`` merged ``[start, end)`` guest-physical ranges.
        self.ram = merge_ranges(np.stack([self._starts, self._ends], axis=1))

    def pieces(self, address: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """``(region index, offset into the read, offset into the region, bytes)`` for each region
        that ``[address, address + length)`` crosses; the range must lie in :attr:`ram`."""
        done = 0
        region = int(np.searchsorted(self._starts, np.uint64(address), side="right")) - 1
        while done < length:
            inside = address + done - int(self._starts[region])
            piece = min(length - done, int(self._ends[region]) - (address + done))
            yield region, done, inside, piece
            done += piece
            region += 1


def parse_host_address(text: str) -> int | None:
    """The host virtual address in ``gpa2hva``'s answer, or None when it names none."""
    match = _HOST_ADDRESS.search(text)
    return None if match is None else int(match[1], 16)
