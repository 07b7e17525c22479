"""An output format's layout checked against the dump's runs, and looked up by guest address: where
in the file each page of the dump goes, and which guest page the file's Nth page holds."""

from __future__ import annotations

import numpy as np

from ..errors import WindumpError
from ..formats.dumpheader import PAGE_SHIFT, PAGE_SIZE
from ..hookspecs import Layout
from ..runs import merge_ranges, runs_to_ranges


def _pairs(array) -> np.ndarray:
    return np.asarray(array, dtype=np.uint64).reshape(-1, 2)


class PageMap:
    """The pages of a layout that holds the pages of ``runs``, each as often as the runs hold it (once:
    a dump's runs do not overlap; WindumpError otherwise), by file position and by guest address.

    A page's *file index* is its position among the dump's pages: the Nth page after the header is
    at file offset ``header_size + N * PAGE_SIZE``.
    """

    def __init__(self, layout: Layout, runs: np.ndarray):
        if not isinstance(layout.header, (bytes, bytearray)):
            raise WindumpError(f"the dump layout's header is {type(layout.header).__name__}, not bytes")
        pages = _pairs(layout.pages)
        pages = pages[pages[:, 1] > 0]
        runs = _pairs(runs)
        count, wanted = int(pages[:, 1].sum()), int(runs[:, 1].sum())
        same = np.array_equal(merge_ranges(runs_to_ranges(pages)), merge_ranges(runs_to_ranges(runs)))
        if count != wanted or not same:
            raise WindumpError(f"the dump layout does not place each of the runs' {wanted:#x} pages once: it places "
                               f"{count:#x} pages{'' if same else ', over other page ranges'}")
        #: ``(N, 2)`` ``[BasePage, PageCount]`` ranges in file order, as the layout lists them.
        self.file_order = pages
        #: Bytes before the first page.
        self.header_size = len(layout.header)
        #: Pages in the dump.
        self.page_count = count
        #: The file's size in bytes.
        self.size = self.header_size + count * PAGE_SIZE
        self._first_index = np.concatenate(([0], np.cumsum(pages[:, 1])[:-1])).astype(np.uint64)
        order = np.argsort(pages[:, 0], kind="stable")
        self._start = pages[order, 0] << np.uint64(PAGE_SHIFT)
        self._end = (pages[order, 0] + pages[order, 1]) << np.uint64(PAGE_SHIFT)
        self._index = self._first_index[order]

    def pieces(self, address: int, length: int) -> list[tuple[int, int, int]]:
        """``(file offset, offset into the range, bytes)`` of each stretch of ``[address, address +
        length)`` that lies contiguously in the file; WindumpError naming the first byte that is in
        no page of the dump."""
        pieces = []
        done = 0
        while done < length:
            here = address + done
            i = int(np.searchsorted(self._start, np.uint64(here), side="right")) - 1 if here >= 0 else -1
            if i < 0 or here >= int(self._end[i]):
                raise WindumpError(f"physical {here:#x} is not in the dump's physical-memory runs")
            inside = here - int(self._start[i])
            count = min(length - done, int(self._end[i]) - here)
            pieces.append((self.header_size + int(self._index[i]) * PAGE_SIZE + inside, done, count))
            done += count
        return pieces

    def page_number(self, index: int) -> int:
        """The guest page number (PFN) of the page with file index ``index``."""
        i = int(np.searchsorted(self._first_index, np.uint64(index), side="right")) - 1
        return int(self.file_order[i, 0]) + index - int(self._first_index[i])
