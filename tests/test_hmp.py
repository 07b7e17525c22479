"""The HMP answers the live sources parse (``info mtree -f`` RAM maps, ``gpa2hva``) and reads split
along the RAM map."""

from __future__ import annotations

import pytest

from windump_plugins.errors import SourceError
from windump_plugins.live.hmp import RamRegion, parse_host_address, parse_ram_map, ram_layout

#: ``info mtree -f`` of a ``pc`` guest with 4 GiB (RAM above 3 GiB moves to 4 GiB), with ROM, ROM
#: devices, RAM devices and the SMM view that must not count as RAM.
PC_MTREE = """FlatView #0
 AS "cpu-smm-0", root: memory
 Root memory region: memory
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram
  0000000000a0000-00000000000bffff (prio 1, ram): smram

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000c7fff (prio 0, rom): pc.ram @00000000000c0000
  00000000000c8000-00000000000fffff (prio 0, ram): pc.ram @00000000000c8000
  0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ramd): vga.vram
  00000000fe000000-00000000fe000fff (prio 1, romd): pflash
  0000000100000000-000000013fffffff (prio 0, ram): pc.ram @00000000c0000000

FlatView #2
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
"""

#: ``info mtree -f`` with RAM in a memory backend named ``ram`` and a RAM-kind VGA region.
BACKEND_MTREE = """\
FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): ram
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  0000000000100000-00000000bfffffff (prio 0, ram): ram @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): ram @00000000c0000000

FlatView #2
 AS "cpu-smm-0", root: memory
  0000000000000000-000000000009ffff (prio 0, ram): smram
"""


def test_only_ram_of_address_space_memory_counts():
    assert parse_ram_map(PC_MTREE) == [
        RamRegion(0x0, 0xA0000, "pc.ram", 0),
        RamRegion(0xC8000, 0x100000, "pc.ram", 0xC8000),
        RamRegion(0x100000, 0xC0000000, "pc.ram", 0x100000),
        RamRegion(0x100000000, 0x140000000, "pc.ram", 0xC0000000),
    ]


def test_block_offsets_are_kept():
    assert parse_ram_map(BACKEND_MTREE) == [
        RamRegion(0, 0xA0000, "ram", 0),
        RamRegion(0x100000, 0xC0000000, "ram", 0x100000),
        RamRegion(0xFD000000, 0xFE000000, "vga.vram", 0),
        RamRegion(0x100000000, 0x140000000, "ram", 0xC0000000),
    ]


@pytest.mark.parametrize("text", [PC_MTREE, BACKEND_MTREE])
def test_no_memory_view_is_an_error(text):
    with pytest.raises(SourceError, match='no flat view of address space "memory"'):
        parse_ram_map(text.split("FlatView #1")[0])


def test_host_address_of_gpa2hva():
    assert parse_host_address("Host virtual address for 0x100000 (pc.ram) is 0x7f3a5be00000\r\n") == 0x7F3A5BE00000
    assert parse_host_address("No memory is mapped at address 0xfe000000\r\n") is None


def test_layout_merges_ram_and_splits_reads_where_regions_end():
    layout = ram_layout(parse_ram_map(PC_MTREE))
    assert layout.ram.tolist() == [[0x0, 0xA0000], [0xC8000, 0xC0000000], [0x100000000, 0x140000000]]
    # 0x2000 bytes across the seam between the two pc.ram regions at 1 MiB.
    assert layout.split(0xFF000, 0x2000) == [(1, 0, 0x37000, 0x1000), (2, 0x1000, 0, 0x1000)]
    assert layout.split(0x100000010, 0x20) == [(3, 0, 0x10, 0x20)]
