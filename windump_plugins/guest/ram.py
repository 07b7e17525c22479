"""The model's physical RAM: the ranges a QEMU machine gives a guest, and what every byte of them
holds once the test guest booted (the model's image, a stamp on each stamped page, zeros).

Nothing is allocated per page of RAM, so a model may reach far above 4 GiB.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import SourceError
from ..formats.dumpheader import PAGE_SHIFT, PAGE_SIZE
from .boot import STAMP_MAGIC

#: RAM of the default model: 36 MiB with the legacy hole below 1 MiB and a 2 MiB hole at 28 MiB.
SAMPLE_RAM = ((0, 0xA0000), (0x100000, 0x1C00000), (0x1E00000, 0x2400000))


def pc_ram(size: int) -> tuple[tuple[int, int], ...]:
    """The RAM ranges QEMU's ``pc`` machine gives a guest of ``size`` bytes: the legacy hole at
    0xA0000-0x100000, and above 3.5 GiB low RAM stops at 3 GiB and the rest moves above 4 GiB."""
    if size <= 0x100000:
        raise ValueError(f"{size:#x} bytes of RAM end before the legacy hole does")
    low = size if size < 0xE0000000 else 0xC0000000
    ram = ((0, 0xA0000), (0x100000, low))
    return ram + ((0x100000000, 0x100000000 + size - low),) if size > low else ram


def ram_ranges(ram: Sequence[Sequence[int]]) -> np.ndarray:
    """Validated, page-aligned ``(N, 2)`` uint64 [start, end) ranges with touching neighbours
    merged; ValueError unless ``ram`` is sorted, non-overlapping and non-empty."""
    r = np.asarray(ram, dtype=np.uint64).reshape(-1, 2)
    if not len(r) or (r % PAGE_SIZE).any() or (r[:, 0] >= r[:, 1]).any() or (r[1:, 0] < r[:-1, 1]).any():
        raise ValueError("RAM must be sorted, non-overlapping, non-empty page-aligned [start, end) ranges")
    gap = r[1:, 0] != r[:-1, 1]
    return np.stack([r[np.r_[True, gap], 0], r[np.r_[gap, True], 1]], axis=1)


def subtract(ranges: np.ndarray, cut_start: int, cut_end: int) -> np.ndarray:
    """Sorted [start, end) ``ranges`` minus the interval [cut_start, cut_end)."""
    left = np.stack([ranges[:, 0], np.minimum(ranges[:, 1], np.uint64(cut_start))], axis=1)
    right = np.stack([np.maximum(ranges[:, 0], np.uint64(cut_end)), ranges[:, 1]], axis=1)
    pieces = np.concatenate([left, right])
    pieces = pieces[pieces[:, 0] < pieces[:, 1]]
    return pieces[np.argsort(pieces[:, 0], kind="stable")]


def inside(ranges: np.ndarray, addresses: np.ndarray) -> np.ndarray:
    """Which ``addresses`` fall in one of the sorted [start, end) ``ranges``."""
    i = np.searchsorted(ranges[:, 0], addresses, side="right") - 1
    return (i >= 0) & (addresses < ranges[np.maximum(i, 0), 1])


class BootedRam:
    """Guest RAM as the booted test guest leaves it: ``image`` at ``image_base``, the stamp on
    every page of ``stamp_ranges`` ((N, 2) [start, end) bytes), zeros elsewhere in ``ram``."""

    def __init__(self, ram: np.ndarray, image_base: int, image: bytes, stamp_ranges: np.ndarray) -> None:
        self.ram = ram
        self.image_base = image_base
        self.stamp_ranges = stamp_ranges
        self._image = np.frombuffer(image, dtype=np.uint8)

    def readinto(self, address: int, buffer: memoryview | bytearray) -> None:
        """Fill ``buffer`` with the guest's physical memory from ``address``; SourceError unless the
        range lies in one RAM range."""
        out = np.frombuffer(buffer, dtype=np.uint8)
        end = address + len(out)
        i = int(np.searchsorted(self.ram[:, 0], np.uint64(max(address, 0)), side="right")) - 1
        if address < 0 or i < 0 or end > int(self.ram[i, 1]):
            raise SourceError(f"sample guest: physical range {address:#x}-{end:#x} is not in guest RAM")
        out[:] = 0
        low, high = max(address, self.image_base), min(end, self.image_base + len(self._image))
        if low < high:
            out[low - address:high - address] = self._image[low - self.image_base:high - self.image_base]
        if not len(out):
            return
        pfns = np.arange(address >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1, dtype=np.uint64)
        pfns = pfns[inside(self.stamp_ranges, pfns << np.uint64(PAGE_SHIFT))]
        stamps = np.empty((len(pfns), 2), dtype="<u8")
        stamps[:, 0], stamps[:, 1] = pfns, STAMP_MAGIC
        positions = (pfns.astype(np.int64) << PAGE_SHIFT)[:, None] - address + np.arange(16)
        wanted = (positions >= 0) & (positions < len(out))
        out[positions[wanted]] = stamps.view(np.uint8).reshape(-1, 16)[wanted]
