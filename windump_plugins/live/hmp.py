"""What the live sources read from QEMU's human monitor (HMP): the guest's RAM map (``info mtree
-f``), reads split along it, and where QEMU keeps guest RAM in its own address space (``gpa2hva``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from ..errors import SourceError
from ..pieces import PieceMap

_FLATVIEW_ENTRY = re.compile(r"^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ram\): (\S+)(?: @([0-9a-f]+))?", re.MULTILINE)
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
    for view in re.split(r"^FlatView #\d+\n", text, flags=re.MULTILINE):
        if re.search(r'^ AS "memory",', view, flags=re.MULTILINE):
            return [RamRegion(int(start, 16), int(last, 16) + 1, block, int(offset or "0", 16))
                    for start, last, block, offset in _FLATVIEW_ENTRY.findall(view)]
    raise SourceError('"info mtree -f" shows no flat view of address space "memory"')


def ram_layout(regions: Sequence[RamRegion]) -> PieceMap:
    """The regions as pieces of guest RAM, to split reads where one region ends."""
    return PieceMap([region.start for region in regions], [region.end for region in regions])


def parse_host_address(text: str) -> int | None:
    """The host virtual address in ``gpa2hva``'s answer, or None when it names none."""
    match = _HOST_ADDRESS.search(text)
    return None if match is None else int(match[1], 16)
