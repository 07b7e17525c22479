"""Guest physical memory as sorted, disjoint pieces, each served its own way (a stretch of a file,
a QEMU RAM block): the RAM ranges they make, and reads split where one piece ends."""

from __future__ import annotations

import numpy as np

from .runs import merge_ranges


class PieceMap:
    """Sorted, disjoint ``[start, end)`` pieces of guest physical memory."""

    def __init__(self, starts, ends):
        self.starts = np.asarray(starts, dtype=np.uint64)
        self.ends = np.asarray(ends, dtype=np.uint64)
        ram = merge_ranges(np.stack([self.starts, self.ends], axis=1))
        ram.flags.writeable = False
        #: ``(N, 2)`` ``[start, end)`` RAM ranges: pieces that touch read as one range.
        self.ram = ram

    def split(self, address: int, length: int) -> list[tuple[int, int, int, int]]:
        """``(piece index, offset into the read, offset into the piece, bytes)`` for each piece that
        ``[address, address + length)`` crosses. The range must lie in :attr:`ram` (callers check)."""
        index = int(np.searchsorted(self.starts, np.uint64(address), side="right")) - 1
        pieces = []
        done = 0
        while done < length:
            inside = address + done - int(self.starts[index])
            count = min(length - done, int(self.ends[index]) - (address + done))
            pieces.append((index, done, inside, count))
            done += count
            index += 1
        return pieces
