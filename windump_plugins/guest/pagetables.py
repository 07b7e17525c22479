"""x86-64 4-level page tables written into the model's image, with 4 KiB, 2 MiB and 1 GiB pages, and
the model's own record of what they map (to check a page-table walk against)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import TranslationError
from ..formats.dumpheader import PAGE_SIZE

# Page-table entry bits.
PTE_PRESENT = 0x1
PTE_WRITABLE = 0x2
PTE_LARGE = 0x80
PTE_NX = 1 << 63
PTE_ADDRESS = 0x000F_FFFF_FFFF_F000

LARGE_PAGE = 1 << 21
HUGE_PAGE = 1 << 30

#: Page size -> the shift of the level whose entry maps it.
_LEAF_SHIFT = {PAGE_SIZE: 12, LARGE_PAGE: 21, HUGE_PAGE: 30}


class Mapping(NamedTuple):
    """One contiguous mapping the model's page tables make: ``size`` bytes from ``virtual``."""

    virtual: int
    physical: int
    size: int
    page_size: int


class PageTables:
    """Page tables built in ``image`` (loaded at physical ``image_base``), their tables taken one
    page at a time from the pool at physical [``pool_start``, ``pool_end``); the first is the PML4
    at :attr:`directory_table_base`."""

    def __init__(self, image: bytearray, image_base: int, pool_start: int, pool_end: int) -> None:
        self._words = np.frombuffer(image, dtype="<u8")
        self._image_base = image_base
        self._next_table, self._pool_end = pool_start, pool_end
        self.mappings: list[Mapping] = []
        self.directory_table_base = self._new_table()

    def _new_table(self) -> int:
        if self._next_table >= self._pool_end:
            raise ValueError(f"the page-table pool ends at {self._pool_end:#x}")
        table, self._next_table = self._next_table, self._next_table + PAGE_SIZE
        return table

    def _entry(self, physical: int) -> int:
        return int(self._words[(physical - self._image_base) // 8])

    def _set_entry(self, physical: int, value: int) -> None:
        self._words[(physical - self._image_base) // 8] = value

    def map(self, virtual: int, physical: int, size: int, page_size: int, flags: int) -> None:
        """Map ``size`` bytes with pages of ``page_size`` (4 KiB, 2 MiB or 1 GiB), creating tables;
        ``flags`` go into every leaf entry (present is implied)."""
        leaf_shift = _LEAF_SHIFT[page_size]
        for offset in range(0, size, page_size):
            table = self.directory_table_base
            for shift in range(39, leaf_shift, -9):
                slot = table + ((virtual + offset) >> shift & 0x1FF) * 8
                if not self._entry(slot):
                    self._set_entry(slot, self._new_table() | PTE_PRESENT | PTE_WRITABLE)
                table = self._entry(slot) & PTE_ADDRESS
            leaf = physical + offset | flags | PTE_PRESENT | (PTE_LARGE if page_size != PAGE_SIZE else 0)
            self._set_entry(table + ((virtual + offset) >> leaf_shift & 0x1FF) * 8, leaf)
        self.mappings.append(Mapping(virtual, physical, size, page_size))

    def virtual_to_physical(self, va: int) -> int:
        """Where ``va`` lies, from the record of mappings (not a page-table walk)."""
        for m in self.mappings:
            if m.virtual <= va < m.virtual + m.size:
                return m.physical + va - m.virtual
        raise TranslationError(f"sample guest: virtual address {va:#x} is not mapped")
