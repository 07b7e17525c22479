"""The difference table (``docs/differences.csv``): every region where windump's dump may differ from
QEMU's ``dump-guest-memory -w`` for the same guest state, and the comparison every test makes with it.

A row's region is ``header:FIELD`` (a DUMP_HEADER64 field of :mod:`windump_plugins.formats.dumpheader`) or
``body:KIND`` for guest memory located through the dump's own structures; :data:`BODY_REGIONS` says
how each body kind is found. Two dumps must agree byte for byte everywhere else.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from windump_plugins.dumpfile import DumpFile, run_segments
from windump_plugins.errors import FormatError, WindumpError
from windump_plugins.formats.context import CONTEXT
from windump_plugins.formats.dumpheader import PAGE_SIZE
from windump_plugins.formats.kdbg import KDDEBUGGER_DATA64, OWNER_TAG
from windump_plugins.paging import AddressSpace

DIFFERENCES_CSV = Path(__file__).resolve().parent.parent / "docs" / "differences.csv"

#: Chunk of each file compared at a time, so memory use stays flat for multi-GiB dumps.
COMPARE_CHUNK = 64 << 20

#: Differing regions listed in a failure message; the rest are counted.
REPORT_LIMIT = 40


class Row(NamedTuple):
    """One row of the difference table."""

    region: str
    reason: str
    issue: str


class Masked(NamedTuple):
    """File bytes ``[offset, offset + length)`` that may differ, and the row that allows it."""

    offset: int
    length: int
    row: Row


def load_differences(path: str | os.PathLike = DIFFERENCES_CSV) -> list[Row]:
    """The rows of the difference table, in file order."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != list(Row._fields):
            raise FormatError(f"{path}: columns are {reader.fieldnames}, expected {list(Row._fields)}")
        return [Row(**record) for record in reader]


def _virtual_extents(dump: DumpFile, space: AddressSpace, address: int, length: int) -> list[tuple[int, int]]:
    """``(file offset, length)`` pieces of the dump that hold guest virtual ``[address, address+length)``."""
    pieces = []
    end = address + length
    while address < end:
        step = min(end, (address & ~(PAGE_SIZE - 1)) + PAGE_SIZE) - address
        physical = int(space.translate(address))
        pieces += [(extent.offset, extent.length) for extent in dump.file_extents(physical, step)]
        address += step
    return pieces


def kprcb_context_extents(dump: DumpFile) -> list[tuple[int, int]]:
    """Where each processor's CONTEXT lies in the dump file: KdDebuggerDataBlock -> KiProcessorBlock[i]
    -> KPRCB + OffsetPrcbContext -> 0x4D0 bytes, for i below the header's NumberProcessors.

    Raises FormatError when the header's KdDebuggerDataBlock is not a plaintext KDBG.
    """
    header = dump.header
    space = AddressSpace(dump, int(header["DirectoryTableBase"]))
    kdbg_address = int(header["KdDebuggerDataBlock"])
    kdbg = space.read_struct(kdbg_address, KDDEBUGGER_DATA64)
    if bytes(kdbg["OwnerTag"]) != OWNER_TAG:
        raise FormatError(
            f"{dump.path}: KdDebuggerDataBlock {kdbg_address:#x} holds OwnerTag {bytes(kdbg['OwnerTag'])!r},"
            f" not {OWNER_TAG!r}, so the KPRCB contexts cannot be found"
        )
    extents = []
    for i in range(int(header["NumberProcessors"])):
        prcb = space.read_u64(int(kdbg["KiProcessorBlock"]) + 8 * i)
        context = space.read_u64(prcb + int(kdbg["OffsetPrcbContext"]))
        extents += _virtual_extents(dump, space, context, CONTEXT.itemsize)
    return extents


#: How each ``body:KIND`` region is found in a dump.
BODY_REGIONS: dict[str, Callable[[DumpFile], list[tuple[int, int]]]] = {
    "kprcb-contexts": kprcb_context_extents,
}


def _region_extents(dump: DumpFile, region: str) -> list[tuple[int, int]]:
    kind, _, name = region.partition(":")
    if kind == "header" and name in (dump.format.dtype.fields or {}):
        field_type, offset = dump.format.dtype.fields[name][:2]
        return [(offset, field_type.itemsize)]
    if kind == "body" and name in BODY_REGIONS:
        return BODY_REGIONS[name](dump)
    raise FormatError(
        f"difference table region {region!r} is neither header:FIELD of {dump.format.name}'s header"
        f" nor body:KIND with KIND one of {sorted(BODY_REGIONS)}"
    )


def difference_mask(dump_path: str | os.PathLike, rows: list[Row] | None = None) -> list[Masked]:
    """The file regions of ``dump_path`` that the difference table (or ``rows``) allows to differ."""
    rows = load_differences() if rows is None else rows
    with DumpFile(dump_path) as dump:
        return [Masked(offset, length, row) for row in rows for offset, length in _region_extents(dump, row.region)]


def header_field_name(dtype: np.dtype, offset: int) -> str:
    """The innermost field of ``dtype`` holding byte ``offset``, as ``PhysicalMemoryBlock.Run[3].PageCount``;
    ``reserved`` for a byte in no field."""
    for name, (field_type, start, *_) in (dtype.fields or {}).items():
        if start <= offset < start + field_type.itemsize:
            inner = offset - start
            if field_type.subdtype is not None:
                element, _shape = field_type.subdtype
                index, inner = divmod(inner, element.itemsize)
                name, field_type = f"{name}[{index}]", element
            if field_type.fields:
                return f"{name}.{header_field_name(field_type, inner)}"
            return name
    return "reserved"


def _differing_regions(ours_path: str, theirs_path: str, masked: list[Masked]) -> list[tuple[int, int]]:
    """``(offset, end)`` stretches where the two equal-sized files differ outside ``masked``.

    The files are read a chunk at a time into two reused buffers; a chunk whose 8-byte words all
    agree is done with, and only a differing chunk is compared byte by byte and masked.
    """
    ours_buffer = np.empty(COMPARE_CHUNK, dtype=np.uint8)
    theirs_buffer = np.empty(COMPARE_CHUNK, dtype=np.uint8)
    regions: list[tuple[int, int]] = []
    with open(ours_path, "rb", buffering=0) as ours_file, open(theirs_path, "rb", buffering=0) as theirs_file:
        size = os.fstat(ours_file.fileno()).st_size
        for start in range(0, size, COMPARE_CHUNK):
            stop = min(start + COMPARE_CHUNK, size)
            ours, theirs = ours_buffer[: stop - start], theirs_buffer[: stop - start]
            for file, buffer in ((ours_file, ours), (theirs_file, theirs)):
                if file.readinto(memoryview(buffer)) != len(buffer):
                    raise AssertionError(f"{file.name} ended before {stop} bytes")
            if not len(ours) % 8 and np.array_equal(ours.view("<u8"), theirs.view("<u8")):
                continue
            differs = ours != theirs
            for offset, length, _row in masked:
                lo, hi = max(offset, start), min(offset + length, stop)
                if lo < hi:
                    differs[lo - start : hi - start] = False
            edges = np.flatnonzero(np.diff(np.concatenate(([False], differs, [False])).astype(np.int8)))
            stretches = edges.reshape(-1, 2) + start
            if regions and stretches.size and regions[-1][1] == stretches[0, 0]:
                regions[-1] = (regions[-1][0], int(stretches[0, 1]))
                stretches = stretches[1:]
            regions += [(int(a), int(b)) for a, b in stretches]
    return regions


def _describe(regions: list[tuple[int, int]], dump: DumpFile) -> list[str]:
    """One line per region: header field names, or the physical address of body bytes."""
    starts, ends, offsets = run_segments(dump.runs, dump.format.size)
    file_ends = offsets + (ends - starts)
    lines = []
    for offset, end in regions:
        if offset < dump.format.size:
            last = min(end, dump.format.size) - 1
            first_name = header_field_name(dump.format.dtype, offset)
            last_name = header_field_name(dump.format.dtype, last)
            names = first_name if first_name == last_name else f"{first_name} .. {last_name}"
            lines.append(f"header {offset:#x}-{end:#x}: {names}")
        else:
            i = np.flatnonzero((offsets <= np.uint64(offset)) & (np.uint64(offset) < file_ends))
            where = f"physical {int(starts[i[0]] + (offset - offsets[i[0]])):#x}" if i.size else "outside every run"
            lines.append(f"body {offset:#x}-{end:#x}: {where} ({end - offset} bytes)")
    return lines


def assert_same_outside_differences(
    ours_path: str | os.PathLike, qemu_path: str | os.PathLike, rows: list[Row] | None = None
) -> None:
    """Fail unless the two dumps have the same length and the same bytes outside the regions the
    difference table (or ``rows``) masks in either of them; the failure lists each differing region."""
    ours_path, qemu_path = os.fspath(ours_path), os.fspath(qemu_path)
    sizes = os.path.getsize(ours_path), os.path.getsize(qemu_path)
    assert sizes[0] == sizes[1], f"{ours_path} has {sizes[0]} bytes, {qemu_path} has {sizes[1]}"
    masked, unlocated = [], []
    for path in (ours_path, qemu_path):
        try:
            masked += difference_mask(path, rows)
        except WindumpError as error:  # a damaged dump: still show how it differs
            unlocated.append(f"the masked regions of {path} cannot be located: {error}")
    regions = _differing_regions(ours_path, qemu_path, masked)
    lines = list(unlocated)
    if regions:
        with DumpFile(ours_path) as dump:
            lines += _describe(regions[:REPORT_LIMIT], dump)
        if len(regions) > REPORT_LIMIT:
            lines.append(f"... and {len(regions) - REPORT_LIMIT} more regions")
    if lines:
        raise AssertionError(
            f"{ours_path} and {qemu_path} differ outside the difference table in {len(regions)} regions:\n  "
            + "\n  ".join(lines)
        )
