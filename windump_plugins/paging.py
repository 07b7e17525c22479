"""Guest virtual memory over a physical MemorySource: x86 page-table walks, vectorised with numpy.

A paging mode is data (as in volatility3's ``layers/intel.py``): its levels from the top table down,
the width and flags of an entry. :class:`AddressSpace` walks any such mode for a whole array of
addresses at once, reading each page-table page once per level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import TranslationError
from .formats.dumpheader import PAGE_SHIFT, PAGE_SIZE
from .source import MemorySource


class PagingLevel(NamedTuple):
    """One level of page tables: its name, how many virtual-address bits index it, and whether an
    entry with the large-page (PS) bit ends the walk there."""

    name: str
    bits: int
    large_page: bool


@dataclass(frozen=True)
class PagingMode:
    """An x86 paging mode as data; :class:`AddressSpace` needs nothing else to walk it."""

    name: str
    levels: tuple[PagingLevel, ...]
    entry_size: int
    #: Bits of an entry that hold the physical address of the next table or of the page.
    entry_address_mask: int
    #: Bits of CR3 that hold the top table's physical address (the rest: PCID, flags).
    directory_mask: int
    present_bit: int = 1 << 0
    large_page_bit: int = 1 << 7
    #: True when the bits above the walked ones must copy the top walked bit (x86-64 "canonical"
    #: addresses); False when they must be zero.
    sign_extended: bool = True

    @property
    def virtual_bits(self) -> int:
        """Bits of a virtual address that the walk uses (48 for 4-level x86-64)."""
        return PAGE_SHIFT + sum(level.bits for level in self.levels)

    def is_canonical(self, addresses: np.ndarray) -> np.ndarray:
        """Which of the uint64 ``addresses`` this mode can translate at all."""
        top = addresses >> np.uint64(self.virtual_bits - (1 if self.sign_extended else 0))
        if not self.sign_extended:
            return top == 0
        return (top == 0) | (top == np.uint64((1 << (65 - self.virtual_bits)) - 1))


#: 4-level x86-64 paging with 1 GiB and 2 MiB pages: the only mode tested against real guests.
X86_64 = PagingMode(
    name="x86-64",
    levels=(
        PagingLevel("PML4", 9, False),
        PagingLevel("PDPT", 9, True),
        PagingLevel("PD", 9, True),
        PagingLevel("PT", 9, False),
    ),
    entry_size=8,
    entry_address_mask=0x000F_FFFF_FFFF_F000,
    directory_mask=0x7FFF_FFFF_FFFF_F000,
)

#: 5-level x86-64 paging (LA57). Untested against real guests: no test guest runs with it.
X86_64_LA57 = PagingMode(
    name="x86-64 5-level",
    levels=(PagingLevel("PML5", 9, False),) + X86_64.levels,
    entry_size=8,
    entry_address_mask=X86_64.entry_address_mask,
    directory_mask=X86_64.directory_mask,
)

#: 32-bit PAE paging with 2 MiB pages. Untested against real guests: there is no 32-bit test guest.
PAE = PagingMode(
    name="PAE",
    levels=(PagingLevel("PDPT", 2, False), PagingLevel("PD", 9, True), PagingLevel("PT", 9, False)),
    entry_size=8,
    entry_address_mask=0x000F_FFFF_FFFF_F000,
    directory_mask=0xFFFF_FFE0,
    sign_extended=False,
)

#: 32-bit paging with 4 MiB pages (no PSE-36 high address bits). Untested against real guests.
X86 = PagingMode(
    name="x86",
    levels=(PagingLevel("PD", 10, True), PagingLevel("PT", 10, False)),
    entry_size=4,
    entry_address_mask=0xFFFF_F000,
    directory_mask=0xFFFF_F000,
    sign_extended=False,
)


class AddressSpace:
    """Guest virtual memory as the page tables at ``directory_table_base`` map it.

    Table pages are read through the source's ``readinto``, so an entry pointing outside RAM raises
    the source's SourceError; nothing is cached, so a live source is seen as it is now.
    """

    def __init__(self, source: MemorySource, directory_table_base: int, mode: PagingMode = X86_64):
        self.source = source
        self.mode = mode
        self.directory_table_base = directory_table_base & mode.directory_mask

    def translate(self, addresses) -> np.ndarray:
        """The physical addresses of ``addresses`` (an int or any uint64 array), in the same shape.

        Raises TranslationError naming the first address, in input order, that does not translate
        and the level where its walk stopped.
        """
        va = np.asarray(addresses, dtype=np.uint64)
        flat = va.ravel()
        mode = self.mode
        physical = np.zeros(flat.shape, dtype=np.uint64)
        # Where each walk stopped short: the level's depth (len(levels) for a non-canonical
        # address) and the entry found there.
        failed_depth = np.where(mode.is_canonical(flat), -1, len(mode.levels))
        failed_entry = np.zeros((flat.size, 2), dtype=np.uint64)  # [physical address, value]

        walking = failed_depth < 0
        table = np.full(flat.shape, self.directory_table_base, dtype=np.uint64)
        shift = mode.virtual_bits
        for depth, level in enumerate(mode.levels):
            shift -= level.bits
            pending = np.flatnonzero(walking)
            if not pending.size:
                break
            index = (flat[pending] >> np.uint64(shift)) & np.uint64((1 << level.bits) - 1)
            entry_address = table[pending] + index * np.uint64(mode.entry_size)
            entries = self._read_entries(entry_address)

            absent = (entries & np.uint64(mode.present_bit)) == 0
            failed_depth[pending[absent]] = depth
            failed_entry[pending[absent]] = np.stack([entry_address[absent], entries[absent]], axis=1)

            target = entries & np.uint64(mode.entry_address_mask)
            large = level.large_page & ((entries & np.uint64(mode.large_page_bit)) != 0)
            ends = ~absent & (large | (depth == len(mode.levels) - 1))
            page_mask = np.uint64((1 << shift) - 1)
            done = pending[ends]
            physical[done] = (target[ends] & ~page_mask) | (flat[done] & page_mask)
            walking[pending[absent | ends]] = False
            table[pending] = target

        failed = np.flatnonzero(failed_depth >= 0)
        if failed.size:
            raise self._translation_error(int(flat[failed[0]]), int(failed_depth[failed[0]]), failed_entry[failed[0]])
        return physical.reshape(va.shape)

    def _translation_error(self, address: int, depth: int, entry: np.ndarray) -> TranslationError:
        mode = self.mode
        if depth == len(mode.levels):
            reason = f"it is not canonical for {mode.name} paging ({mode.virtual_bits}-bit)"
        else:
            entry_address, value = (int(v) for v in entry)
            reason = f"its {mode.levels[depth].name} entry {value:#x} at physical {entry_address:#x} is not present"
        return TranslationError(f"virtual address {address:#x} does not translate: {reason}")

    def _read_entries(self, entry_address: np.ndarray) -> np.ndarray:
        """Page-table entries at the physical ``entry_address`` array, reading each table page once."""
        mode = self.mode
        pages, inverse = np.unique(entry_address >> np.uint64(PAGE_SHIFT), return_inverse=True)
        raw = np.empty((pages.size, PAGE_SIZE), dtype=np.uint8)
        for row, page in enumerate(pages.tolist()):
            self.source.readinto(page << PAGE_SHIFT, memoryview(raw[row]))
        tables = raw.view(f"<u{mode.entry_size}")
        slot = (entry_address & np.uint64(PAGE_SIZE - 1)) // np.uint64(mode.entry_size)
        return tables[inverse.ravel(), slot.astype(np.intp)].astype(np.uint64)

    def read(self, address: int, length: int) -> bytes:
        """``length`` bytes of guest virtual memory from ``address``, across any page boundaries."""
        buffer = bytearray(length)
        if not length:
            return bytes(buffer)
        if address < 0 or length < 0 or address + length > 1 << 64:
            raise TranslationError(f"virtual range {address:#x}+{length:#x} is outside the 64-bit address space")
        first_page = address >> PAGE_SHIFT
        last_page = (address + length - 1) >> PAGE_SHIFT
        pages = np.arange(first_page, last_page + 1, dtype=np.uint64) << np.uint64(PAGE_SHIFT)
        pages[0] = address  # so that a fault in the first page names the address asked for
        physical = self.translate(pages)
        # Read physically contiguous stretches of pages in one call each.
        frames = physical & ~np.uint64(PAGE_SIZE - 1)
        breaks = np.flatnonzero(np.diff(frames) != np.uint64(PAGE_SIZE)) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        stops = np.append(breaks, frames.size).tolist()
        view = memoryview(buffer)
        offset = address & (PAGE_SIZE - 1)
        for start, stop in zip(starts, stops):
            begin = max(start * PAGE_SIZE - offset, 0)
            end = min(stop * PAGE_SIZE - offset, length)
            self.source.readinto(int(physical[start]), view[begin:end])
        return bytes(buffer)

    def read_struct(self, address: int, dtype: np.dtype) -> np.ndarray:
        """A writable 0-d array of ``dtype`` read from ``address``, bytes between its fields included
        (which ``ndarray.copy`` would drop)."""
        dtype = np.dtype(dtype)
        return np.frombuffer(bytearray(self.read(address, dtype.itemsize)), dtype=dtype).reshape(())

    def read_u64(self, address: int) -> int:
        """The little-endian u64 at ``address``."""
        return int.from_bytes(self.read(address, 8), "little")

    def read_u32(self, address: int) -> int:
        """The little-endian u32 at ``address``."""
        return int.from_bytes(self.read(address, 4), "little")

    def read_u16(self, address: int) -> int:
        """The little-endian u16 at ``address``."""
        return int.from_bytes(self.read(address, 2), "little")
