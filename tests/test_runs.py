"""Run assembly: merge_ranges, pages_to_runs, conversions and check_runs against set-based references."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from windump_plugins.errors import FormatError, WindumpError
from windump_plugins.runs import check_runs, merge_ranges, pages_to_runs, ranges_to_runs, runs_to_ranges

small_ranges = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1])),
                        max_size=20)


def covered(ranges) -> set[int]:
    return {x for start, end in ranges for x in range(int(start), int(end))}


@given(small_ranges)
def test_merge_ranges_covers_the_same_bytes_sorted_and_disjoint(ranges):
    merged = merge_ranges(np.array(ranges, dtype=np.uint64).reshape(-1, 2))
    assert merged.dtype == np.uint64 and merged.shape[1:] == (2,)
    assert covered(merged) == covered(ranges)
    assert (merged[:, 0] < merged[:, 1]).all()
    # Strictly apart: touching ranges would have been merged.
    assert (merged[1:, 0] > merged[:-1, 1]).all()


def test_merge_ranges_examples():
    merged = merge_ranges([[0x3000, 0x4000], [0, 0x1000], [0x1000, 0x2000], [0x3800, 0x3900], [0x5000, 0x5000]])
    assert merged.tolist() == [[0, 0x2000], [0x3000, 0x4000]]
    assert merge_ranges([]).shape == (0, 2)
    assert merge_ranges(np.zeros((0, 2))).shape == (0, 2)


def test_merge_ranges_rejects_a_backwards_range():
    with pytest.raises(FormatError) as error:
        merge_ranges([[0, 0x1000], [0x3000, 0x2000]])
    assert str(error.value) == "range 1 (0x3000-0x2000) ends before it starts"


@given(st.lists(st.integers(0, 300), max_size=60))
def test_pages_to_runs_covers_exactly_the_pages_in_maximal_runs(pfns):
    runs = pages_to_runs(np.array(pfns, dtype=np.uint64))
    assert runs.dtype == np.uint64 and runs.shape[1:] == (2,)
    assert covered(np.stack([runs[:, 0], runs[:, 0] + runs[:, 1]], axis=1)) == set(pfns)
    assert (runs[:, 1] > 0).all()
    # Maximal: a gap of at least one page separates consecutive runs.
    assert (runs[1:, 0] > runs[:-1, 0] + runs[:-1, 1]).all()


def test_pages_to_runs_examples():
    assert pages_to_runs([5, 3, 4, 4, 9, 10, 0]).tolist() == [[0, 1], [3, 3], [9, 2]]
    assert pages_to_runs([]).shape == (0, 2)


def test_runs_and_ranges_convert_both_ways():
    runs = np.array([[0, 0xA0], [0x100, 0x7FF00], [0x100000, 1]], dtype=np.uint64)
    ranges = runs_to_ranges(runs)
    assert ranges.tolist() == [[0, 0xA0000], [0x100000, 0x80000000], [0x100000000, 0x100001000]]
    assert ranges_to_runs(ranges).tolist() == runs.tolist()


@pytest.mark.parametrize(("ranges", "message"), [
    ([[0, 0x1000], [0x2800, 0x3000]], "range 1 (bytes 0x2800-0x3000) does not start on a page boundary"),
    ([[0x1000, 0x1FFF]], "range 0 (bytes 0x1000-0x1fff) does not end on a page boundary"),
])
def test_ranges_to_runs_rejects_unaligned_ranges(ranges, message):
    with pytest.raises(FormatError) as error:
        ranges_to_runs(ranges)
    assert str(error.value) == message


RAM = np.array([[0, 0xA0000], [0x100000, 0x80000000], [0x100000000, 0x140000000]], dtype=np.uint64)


def test_check_runs_accepts_runs_inside_ram():
    check_runs([[0, 0xA0], [0x100, 0x7FF00], [0x100000, 0x40000]], RAM, max_runs=42)
    check_runs(np.zeros((0, 2)), RAM)


def test_check_runs_treats_touching_ram_blocks_as_one():
    check_runs([[0, 0x20]], [[0x10000, 0x20000], [0, 0x10000]])


@pytest.mark.parametrize(("runs", "message"), [
    ([[0, 0xA0], [0x100, 0]], "run 1 (BasePage 0x100, PageCount 0) is empty"),
    ([[0x100, 0x10], [0, 0x10]],
     "run 1 (pages 0x0-0xf, bytes 0x0-0xffff) starts below run 0 (runs must be sorted by BasePage)"),
    ([[0x100, 0x100], [0x1ff, 0x10]], "run 1 (pages 0x1ff-0x20e, bytes 0x1ff000-0x20efff) overlaps run 0"),
    ([[0, 0xA0], [0xA0, 0x10]],
     "run 1 (pages 0xa0-0xaf, bytes 0xa0000-0xaffff) is not in the source's RAM (QEMU would write zero pages there)"),
    ([[0, 0xA1]],
     "run 0 (pages 0x0-0xa0, bytes 0x0-0xa0fff) runs past the end of RAM range 0x0-0x9ffff "
     "(QEMU would write zero pages there)"),
    ([[0x140000, 1]],
     "run 0 (pages 0x140000-0x140000, bytes 0x140000000-0x140000fff) is not in the source's RAM "
     "(QEMU would write zero pages there)"),
    ([[0xFFFFFFFFFFFFF, 2]],
     "run 0 (pages 0xfffffffffffff-0x10000000000000, bytes 0xfffffffffffff000-0x10000000000000fff) "
     "lies beyond the 64-bit physical address space"),
])
def test_check_runs_names_the_offending_run(runs, message):
    with pytest.raises(WindumpError) as error:
        check_runs(runs, RAM)
    assert str(error.value) == message


def test_check_runs_reports_the_first_offending_run():
    with pytest.raises(WindumpError) as error:
        check_runs([[0, 0xA0], [0xA0, 1], [0x90, 1]], RAM)
    assert str(error.value).startswith("run 1 ")


def test_check_runs_limits_the_number_of_runs():
    runs = [[2 * i, 1] for i in range(43)]
    check_runs(runs[:42], [[0, 0x100000]], max_runs=42)
    with pytest.raises(WindumpError) as error:
        check_runs(runs, [[0, 0x100000]], max_runs=42)
    assert str(error.value) == "43 physical-memory runs, at most 42 fit in the header"


ram_pages = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 12)), max_size=6)
run_lists = st.lists(st.tuples(st.integers(0, 70), st.integers(0, 10)), max_size=6)


@settings(max_examples=300)
@given(ram_pages, run_lists, st.booleans())
def test_check_runs_accepts_exactly_the_valid_runs(ram, runs, unaligned_ram):
    # RAM in bytes; with unaligned_ram its ranges shrink by a few bytes, losing their edge pages.
    trim = 8 if unaligned_ram else 0
    ram_bytes = [(start * 0x1000 + trim, (start + size) * 0x1000 - trim) for start, size in ram if size]
    ram_bytes = [(s, e) for s, e in ram_bytes if s < e]  # unsorted, overlapping: check_runs merges
    ram_blocks = merge_ranges(np.array(ram_bytes, dtype=np.uint64).reshape(-1, 2))  # as MemorySource.ram

    def inside_one_block(base, count):
        return any(s <= base * 0x1000 and (base + count) * 0x1000 <= e for s, e in ram_blocks.tolist())

    valid = (
        all(count > 0 for _, count in runs)
        and all(b1 >= b0 + c0 for (b0, c0), (b1, _) in zip(runs, runs[1:]))
        and all(inside_one_block(base, count) for base, count in runs)
    )
    array = np.array(runs, dtype=np.uint64).reshape(-1, 2)
    if valid:
        check_runs(array, ram_bytes)
    else:
        with pytest.raises(FormatError):
            check_runs(array, ram_bytes)
