"""Physical-memory runs and byte ranges as numpy arrays: merging, conversion and the checks a dump's runs must pass.

A *range* is ``[start, end)`` in bytes, a *run* is ``[BasePage, PageCount]`` as in the dump header's
PhysicalMemoryBlock; both travel as ``(N, 2)`` uint64 arrays. Every function here is pure and
vectorised, so full dumps, bitmap dumps and driverless headers share them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import FormatError
from .formats.dumpheader import PAGE_SHIFT, PAGE_SIZE

#: Page-frame numbers above this would put a byte beyond the 64-bit physical address space.
_PFN_LIMIT = 1 << (64 - PAGE_SHIFT)


def _pairs(array) -> np.ndarray:
    return np.asarray(array, dtype=np.uint64).reshape(-1, 2)


def merge_ranges(ranges) -> np.ndarray:
    """Sorted, disjoint ``[start, end)`` ranges covering the same bytes as ``ranges``.

    ``ranges`` may come in any order, overlap or touch; touching ranges become one, empty ones vanish.
    Raises FormatError for a range that ends before it starts.
    """
    ranges = _pairs(ranges)
    backwards = np.flatnonzero(ranges[:, 1] < ranges[:, 0])
    if backwards.size:
        start, end = (int(v) for v in ranges[backwards[0]])
        raise FormatError(f"range {backwards[0]} ({start:#x}-{end:#x}) ends before it starts")
    ranges = ranges[ranges[:, 1] > ranges[:, 0]]
    ranges = ranges[np.argsort(ranges[:, 0], kind="stable")]
    if not len(ranges):
        return np.zeros((0, 2), dtype=np.uint64)
    reach = np.maximum.accumulate(ranges[:, 1])
    first = np.concatenate(([0], np.flatnonzero(ranges[1:, 0] > reach[:-1]) + 1))
    return np.stack([ranges[first, 0], np.maximum.reduceat(ranges[:, 1], first)], axis=1)


def pages_to_runs(pfns) -> np.ndarray:
    """Maximal ``[BasePage, PageCount]`` runs covering exactly the page-frame numbers ``pfns``
    (any order, duplicates allowed)."""
    pfns = np.unique(np.asarray(pfns, dtype=np.uint64).ravel())
    if not pfns.size:
        return np.zeros((0, 2), dtype=np.uint64)
    first = np.concatenate(([0], np.flatnonzero(np.diff(pfns) != 1) + 1))
    counts = np.diff(np.append(first, pfns.size)).astype(np.uint64)
    return np.stack([pfns[first], counts], axis=1)


def runs_to_ranges(runs) -> np.ndarray:
    """The ``[start, end)`` byte ranges of ``[BasePage, PageCount]`` runs."""
    runs = _pairs(runs)
    shift = np.uint64(PAGE_SHIFT)
    return np.stack([runs[:, 0] << shift, (runs[:, 0] + runs[:, 1]) << shift], axis=1)


def ranges_to_runs(ranges) -> np.ndarray:
    """The ``[BasePage, PageCount]`` runs of page-aligned ``[start, end)`` byte ranges.

    Raises FormatError naming the first range whose start or end is not on a page boundary.
    """
    ranges = _pairs(ranges)
    misaligned = np.flatnonzero((ranges % np.uint64(PAGE_SIZE)).any(axis=1))
    if misaligned.size:
        i = int(misaligned[0])
        start, end = (int(v) for v in ranges[i])
        edge = "start" if start % PAGE_SIZE else "end"
        raise FormatError(f"range {i} (bytes {start:#x}-{end:#x}) does not {edge} on a page boundary")
    shift = np.uint64(PAGE_SHIFT)
    return np.stack([ranges[:, 0] >> shift, (ranges[:, 1] - ranges[:, 0]) >> shift], axis=1)


def describe_run(index: int, base_page: int, page_count: int) -> str:
    """``run 3 (pages 0x100-0x1ff, bytes 0x100000-0x1fffff)``: how messages name a run."""
    if page_count == 0:
        return f"run {index} (BasePage {base_page:#x}, PageCount 0)"
    end = base_page + page_count
    return (
        f"run {index} (pages {base_page:#x}-{end - 1:#x}, "
        f"bytes {base_page << PAGE_SHIFT:#x}-{(end << PAGE_SHIFT) - 1:#x})"
    )


def check_runs(runs, ram=None, *, max_runs: int | None = None) -> None:
    """Raise FormatError unless ``runs`` can be dumped from a source with these RAM ranges.

    Runs must be sorted by BasePage, not overlap, hold at least one page, lie in the 64-bit physical
    address space and, unless ``ram`` is None, each lie inside one ``[start, end)`` range of ``ram``
    (merged here, so touching RAM blocks count as one). The message names the first offending run
    and what is wrong with it.
    """
    runs = _pairs(runs)
    if max_runs is not None and len(runs) > max_runs:
        raise FormatError(f"{len(runs)} physical-memory runs, at most {max_runs} fit in the header")
    if not len(runs):
        return
    base, count = runs[:, 0], runs[:, 1]
    limit = np.uint64(_PFN_LIMIT)
    beyond = (base > limit) | (count > limit - np.minimum(base, limit))
    end = np.where(beyond, limit, base + count)
    has_previous = np.arange(len(runs)) > 0
    previous_base = np.roll(base, 1)
    previous_end = np.roll(end, 1)

    problems = [
        (count == 0, lambda i: "is empty"),
        (beyond, lambda i: "lies beyond the 64-bit physical address space"),
        (has_previous & (base < previous_base),
         lambda i: f"starts below run {i - 1} (runs must be sorted by BasePage)"),
        (has_previous & (base < previous_end), lambda i: f"overlaps run {i - 1}"),
    ]
    if ram is not None:
        problems += _ram_problems(base, end, merge_ranges(ram))
    bad = np.logical_or.reduce([mask for mask, _ in problems])
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    message = next(explain(i) for mask, explain in problems if mask[i])
    raise FormatError(f"{describe_run(i, int(base[i]), int(count[i]))} {message}")


def _ram_problems(base: np.ndarray, end: np.ndarray, ram: np.ndarray) -> list[tuple[np.ndarray, Callable[[int], str]]]:
    """``(mask, explain)`` rows for runs ``[base, end)`` (in pages) outside the merged ``ram`` ranges."""
    # RAM in whole pages: a run fits when its pages lie inside [first_page, end_page) of one range.
    page = np.uint64(PAGE_SIZE)
    first_page = (ram[:, 0] + page - np.uint64(1)) // page
    end_page = ram[:, 1] // page
    slot = np.searchsorted(first_page, base, side="right").astype(np.int64) - 1
    slot_end = end_page[np.maximum(slot, 0)] if len(ram) else np.zeros_like(base)
    starts_in_ram = (slot >= 0) & (base < slot_end)
    ends_in_ram = starts_in_ram & (end <= slot_end)

    def past_ram_end(i: int) -> str:
        start, stop = (int(v) for v in ram[slot[i]])
        return f"runs past the end of RAM range {start:#x}-{stop - 1:#x} (QEMU would write zero pages there)"

    return [
        (~starts_in_ram, lambda i: "is not in the source's RAM (QEMU would write zero pages there)"),
        (~ends_in_ram, past_ram_end),
    ]
