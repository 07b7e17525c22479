"""``windump verify`` and ``windump info``: the checks a crash dump must pass for every reader to open
it as intended, and a readable summary of its header.

Each check is a small function returning its problems as one-line strings, so a damaged dump is
reported in full rather than stopping at the first fault. Readers do not check RequiredDumpSpace or
NumberOfPages, and volatility3 silently misreads unsorted runs, hence these checks.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import numpy as np

from .dumpfile import DumpFile, DumpHeader, open_dump, read_dump_header, unsupported_dump_type
from .errors import FormatError, SourceError, TranslationError, WindumpError
from .formats.context import CONTEXT, CONTEXT_AMD64
from .formats.dumpheader import (
    DUMP_TYPE_FULL,
    PAGE_FILLER,
    PAGE_SHIFT,
    X64,
    X86,
    body_size,
    field_offset,
    header_runs,
)
from .formats.kdbg import KDDEBUGGER_DATA64, OWNER_TAG
from .paging import AddressSpace
from .processors import MAX_PROCESSORS, processor_block_entries
from .runs import check_runs

#: The code selector of the Windows x64 kernel.
KERNEL_CS64 = 0x10

#: Header bytes that are padding and must be zero, per format: ``(offset, size, what)``.
PADS = {
    X64.name: (
        (0x03C, 4, "pad after BugCheckCode"),
        (0x08C, 4, "pad after PhysicalMemoryBlock.NumberOfRuns"),
        (0xF1C, 4, "pad after Exception.NumberParameters"),
        (0xF9C, 4, "pad after DumpType"),
    ),
    X86.name: ((0x05E, 2, "pad after KdSecondaryVersion"),),
}

NO_KERNEL_CONTEXT = "processor {} has no kernel CONTEXT: WinDbg will show 'Only x86 user-mode context is available'"

FILETIME_EPOCH = datetime.datetime(1601, 1, 1, tzinfo=datetime.timezone.utc)
#: The last FILETIME Python's datetime can show (the end of 9999), in microseconds since 1601.
LAST_FILETIME_MICROSECONDS = (datetime.datetime.max.replace(tzinfo=datetime.timezone.utc) - FILETIME_EPOCH) // (
    datetime.timedelta(microseconds=1))

HeaderCheck = Callable[[DumpHeader], list[str]]


def _runs(dump: DumpHeader) -> np.ndarray | None:
    """The header's runs, or None when NumberOfRuns does not fit (:func:`check_physical_memory_runs`
    reports that)."""
    try:
        return header_runs(dump.header)
    except FormatError:
        return None


def _is_full_dump(dump: DumpHeader) -> bool:
    return int(dump.header["DumpType"]) == DUMP_TYPE_FULL


def check_dump_type(dump: DumpHeader) -> list[str]:
    """DumpType is one windump reads (and every reader supports)."""
    reason = unsupported_dump_type(int(dump.header["DumpType"]))
    return [reason] if reason else []


def check_machine_image_type(dump: DumpHeader) -> list[str]:
    """MachineImageType matches the header layout, which readers choose by ValidDump."""
    machine = int(dump.header["MachineImageType"])
    if machine == dump.format.machine:
        return []
    return [f"MachineImageType is {machine:#x}, expected {dump.format.machine:#x} "
            f"in a PAGE{dump.format.valid_dump.decode()} dump"]


def check_number_processors(dump: DumpHeader) -> list[str]:
    """At least one processor, or WinDbg has no context to show, and no more than Windows runs on."""
    count = int(dump.header["NumberProcessors"])
    if not count:
        return ["NumberProcessors is 0"]
    if count > MAX_PROCESSORS:
        return [f"NumberProcessors is {count}, more than the {MAX_PROCESSORS} processors Windows runs on"]
    return []


def check_physical_memory_runs(dump: DumpHeader) -> list[str]:
    """Runs fit the header, exist, hold pages, are sorted and do not overlap."""
    try:
        runs = header_runs(dump.header)
    except FormatError as exc:
        return [str(exc)]
    if not len(runs):
        return ["PhysicalMemoryBlock holds no runs"]
    try:
        check_runs(runs, max_runs=dump.format.max_runs)
    except FormatError as exc:
        return [str(exc)]
    return []


def check_number_of_pages(dump: DumpHeader) -> list[str]:
    """NumberOfPages equals the pages of the runs."""
    runs = _runs(dump)
    if runs is None:
        return []
    recorded = int(dump.header["PhysicalMemoryBlock"]["NumberOfPages"])
    pages = int(runs[:, 1].sum())
    return [] if recorded == pages else [f"NumberOfPages is {recorded}, the runs hold {pages}"]


def check_file_size(dump: DumpHeader) -> list[str]:
    """A full dump is exactly the header and the pages of its runs."""
    runs = _runs(dump)
    if runs is None or not _is_full_dump(dump):
        return []
    expected = dump.format.size + body_size(runs)
    if dump.file_size == expected:
        return []
    return [f"file size is {dump.file_size} bytes, header and runs make {expected}"]


def check_required_dump_space(dump: DumpHeader) -> list[str]:
    """RequiredDumpSpace states the size of a full dump."""
    runs = _runs(dump)
    if runs is None or not _is_full_dump(dump):
        return []
    expected = dump.format.size + body_size(runs)
    recorded = int(dump.header["RequiredDumpSpace"])
    return [] if recorded == expected else [f"RequiredDumpSpace is {recorded:#x}, header and runs make {expected:#x}"]


def check_header_context(dump: DumpHeader) -> list[str]:
    """The header's ContextRecord is all zero or an AMD64 CONTEXT that kdmp-parser accepts."""
    record = dump.header["ContextRecord"]
    if dump.format is not X64 or not record.any():
        return []
    context = np.frombuffer(record.tobytes()[: CONTEXT.itemsize], dtype=CONTEXT)[0]
    problems = []
    flags = int(context["ContextFlags"])
    if not flags & CONTEXT_AMD64:
        problems.append(f"header ContextRecord has ContextFlags {flags:#x}, without CONTEXT_AMD64 ({CONTEXT_AMD64:#x})")
    mxcsr, saved = int(context["MxCsr"]), int(context["FltSave"]["MxCsr"])
    if mxcsr != saved:
        problems.append(f"header ContextRecord has MxCsr {mxcsr:#x} but FltSave.MxCsr {saved:#x}")
    return problems


def check_pads(dump: DumpHeader) -> list[str]:
    """Padding holds zero, not Windows' "PAGE" filler."""
    raw = dump.header.tobytes()
    problems = []
    for offset, size, what in PADS[dump.format.name]:
        value = int.from_bytes(raw[offset : offset + size], "little")
        if value:
            problems.append(f"{what} (header offset {offset:#x}) is {value:#x}, expected 0")
    return problems


def check_exception_record(dump: DumpHeader) -> list[str]:
    """No "PAGE" filler left in the exception record (volatility issue 661)."""
    record = dump.header["Exception"]
    words = np.frombuffer(record.tobytes(), dtype="<u4")
    filler = np.flatnonzero(words == PAGE_FILLER)
    if not filler.size:
        return []
    base = field_offset(dump.format.dtype, "Exception")
    offsets = ", ".join(f"{base + 4 * int(i):#x}" for i in filler)
    return [f'the exception record still holds the "PAGE" filler at header offset {offsets}']


#: Header fields debuggers show or use, which must not hold the "PAGE" filler, per format.
FILLER_CHECKED = {
    X64.name: ("NumberProcessors", "SystemTime", "SystemUpTime", "ProductType", "SuiteMask", "SecondaryDataState",
               "MiniDumpFields", "Attributes", "BootId"),
    X86.name: ("NumberProcessors", "SystemTime", "SystemUpTime", "ProductType", "SuiteMask", "SecondaryDataState",
               "MiniDumpFields"),
}


def check_header_filler(dump: DumpHeader) -> list[str]:
    """No "PAGE" filler left in the header fields debuggers show (the boot-time header is full of it)."""
    problems = []
    for name in FILLER_CHECKED[dump.format.name]:
        words = np.frombuffer(dump.header[name].tobytes(), dtype="<u4")
        if (words == PAGE_FILLER).any():
            offset = field_offset(dump.format.dtype, name)
            problems.append(f'{name} (header offset {offset:#x}) still holds the "PAGE" filler')
    return problems


HEADER_CHECKS: tuple[HeaderCheck, ...] = (
    check_dump_type,
    check_machine_image_type,
    check_number_processors,
    check_physical_memory_runs,
    check_number_of_pages,
    check_file_size,
    check_required_dump_space,
    check_header_context,
    check_pads,
    check_exception_record,
    check_header_filler,
)


def check_kdbg(dump: DumpFile, space: AddressSpace) -> tuple[list[str], np.ndarray | None]:
    """KdDebuggerDataBlock points at a plaintext KDBG readable through DirectoryTableBase; returns
    the problems and the KDBG when it is sound."""
    address = int(dump.header["KdDebuggerDataBlock"])
    if not address:
        return ["KdDebuggerDataBlock is 0: readers cannot find KDBG"], None
    try:
        kdbg = space.read_struct(address, KDDEBUGGER_DATA64)
    except (TranslationError, SourceError) as exc:
        dtb = int(dump.header["DirectoryTableBase"])
        return [f"KDBG at {address:#x} is not readable through DirectoryTableBase {dtb:#x}: {exc}"], None
    tag = bytes(kdbg["OwnerTag"])
    if tag != OWNER_TAG:
        return [f"KDBG at {address:#x} has OwnerTag {tag!r}, expected {OWNER_TAG!r} (still encoded?)"], None
    return [], kdbg


def _missing_kernel_context(space: AddressSpace, prcb: int, offset_prcb_context: int) -> str | None:
    """Why the KPRCB at ``prcb`` leads to no kernel CONTEXT, or None when it does."""
    if not prcb:
        return "its KiProcessorBlock entry is 0"
    try:
        address = space.read_u64(prcb + offset_prcb_context)
        context = space.read_struct(address, CONTEXT)
    except (TranslationError, SourceError) as exc:
        return str(exc)
    flags, cs = int(context["ContextFlags"]), int(context["SegCs"])
    if not flags & CONTEXT_AMD64:
        return f"CONTEXT at {address:#x} has ContextFlags {flags:#x}, without CONTEXT_AMD64"
    if cs != KERNEL_CS64:
        return f"CONTEXT at {address:#x} has SegCs {cs:#x}, not the kernel's {KERNEL_CS64:#x}"
    return None


def check_processor_contexts(dump: DumpFile, space: AddressSpace, kdbg: np.ndarray) -> list[str]:
    """Each KiProcessorBlock[i] -> KPRCB + OffsetPrcbContext -> CONTEXT is a kernel-mode AMD64
    CONTEXT, which WinDbg needs to show that processor's registers."""
    count = min(int(dump.header["NumberProcessors"]), MAX_PROCESSORS)  # more: check_number_processors says so
    try:
        prcbs = processor_block_entries(space, kdbg, count)
    except WindumpError as exc:
        return [str(exc)]
    offset = int(kdbg["OffsetPrcbContext"])
    problems = []
    for i, prcb in enumerate(prcbs.tolist()):
        reason = _missing_kernel_context(space, prcb, offset)
        if reason:
            problems.append(f"{NO_KERNEL_CONTEXT.format(i)} ({reason})")
    return problems


def check_guest_memory(dump: DumpFile) -> list[str]:
    """The checks that read guest memory through the header's DirectoryTableBase (x64 dumps)."""
    space = AddressSpace(dump, int(dump.header["DirectoryTableBase"]))
    problems, kdbg = check_kdbg(dump, space)
    if kdbg is not None:
        problems += check_processor_contexts(dump, space, kdbg)
    return problems


def _read_header(path: str | os.PathLike) -> DumpHeader:
    fd = open_dump(path)
    try:
        return read_dump_header(fd)
    finally:
        os.close(fd)


def verify_dump(path: str | os.PathLike) -> list[str]:
    """Every problem found in the dump at ``path``, one line each; empty when the dump is sound.

    Raises SourceError only when the file cannot be opened.
    """
    try:
        dump = _read_header(path)
    except FormatError as exc:
        return [str(exc)]
    problems = [problem for check in HEADER_CHECKS for problem in check(dump)]
    if dump.format is X64:
        try:
            with DumpFile(path) as full_dump:
                problems += check_guest_memory(full_dump)
        except FormatError:
            pass  # a dump DumpFile cannot read: the header checks above have said why
    return problems


def filetime(value: int) -> str | None:
    """A FILETIME (100 ns units since 1601) as an ISO 8601 UTC date, or None for 0 (not set)."""
    if not value:
        return None
    if value // 10 > LAST_FILETIME_MICROSECONDS:
        return f"{value:#x} (after the year 9999: not a time)"
    moment = FILETIME_EPOCH + datetime.timedelta(microseconds=value // 10)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _size(count: int) -> str:
    """Bytes in the largest binary unit that keeps a number of at least 1."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.1f} {unit}"
    return f"{count} B"


#: DumpType values by what they hold.
DUMP_KINDS = {1: "full", 2: "kernel", 5: "bitmap full", 6: "bitmap kernel"}


def dump_info(path: str | os.PathLike) -> dict:
    """What the header of the dump at ``path`` says, as ``windump info --json`` prints it: header
    fields under their Windows names (addresses and codes as ``0x`` strings), file facts in lower case."""
    try:
        fmt, header, file_size = _read_header(path)
    except FormatError as exc:
        raise FormatError(f"{os.fspath(path)}: {exc}") from None
    dump_type = int(header["DumpType"])
    info: dict = {
        "file": os.fspath(path),
        "format": fmt.name,
        "ValidDump": fmt.valid_dump.decode(),
        "MachineImageType": f"{int(header['MachineImageType']):#x}",
        "MajorVersion": int(header["MajorVersion"]),
        "MinorVersion": int(header["MinorVersion"]),
        "DumpType": dump_type,
        "dump_kind": DUMP_KINDS.get(dump_type, "unknown"),
        "DirectoryTableBase": f"{int(header['DirectoryTableBase']):#x}",
        "KdDebuggerDataBlock": f"{int(header['KdDebuggerDataBlock']):#x}",
        "PsLoadedModuleList": f"{int(header['PsLoadedModuleList']):#x}",
        "BugCheckCode": f"{int(header['BugCheckCode']):#x}",
        "BugCheckParameters": [f"{int(header[f'BugCheckParameter{i}']):#x}" for i in range(1, 5)],
        "NumberProcessors": int(header["NumberProcessors"]),
        "SystemTime": filetime(int(header["SystemTime"])),
        "Comment": bytes(header["Comment"]).split(b"\0", 1)[0].decode("ascii", "replace"),
        "file_size": file_size,
        "RequiredDumpSpace": int(header["RequiredDumpSpace"]),
        "runs": None,
        "pages": None,
        "runs_problem": None,
    }
    try:
        runs = header_runs(header)
    except FormatError as exc:
        info["runs_problem"] = str(exc)
        return info
    info["runs"] = [{"BasePage": base, "PageCount": count} for base, count in runs.tolist()]
    info["pages"] = int(runs[:, 1].sum()) if len(runs) else 0
    return info


def describe_dump(path: str | os.PathLike) -> str:
    """A readable summary of the dump header at ``path``, for ``windump info``."""
    info = dump_info(path)
    lines = [
        f"format               {info['format']} (PAGE{info['ValidDump']}), MachineImageType {info['MachineImageType']}",
        f"version              {info['MajorVersion']:#x}.{info['MinorVersion']}",
        f"DumpType             {info['DumpType']} ({info['dump_kind']})",
        f"DirectoryTableBase   {info['DirectoryTableBase']}",
        f"KdDebuggerDataBlock  {info['KdDebuggerDataBlock']}",
        f"PsLoadedModuleList   {info['PsLoadedModuleList']}",
        f"bug check            {info['BugCheckCode']} ({', '.join(info['BugCheckParameters'])})",
        f"processors           {info['NumberProcessors']}",
        f"system time          {info['SystemTime'] or 'not set'}",
        f"comment              {info['Comment'] or '(none)'}",
        f"file size            {info['file_size']} bytes ({_size(info['file_size'])})",
        f"RequiredDumpSpace    {info['RequiredDumpSpace']} bytes",
    ]
    if info["runs"] is None:
        return "\n".join(lines + [f"runs                 {info['runs_problem']}"])
    pages = info["pages"]
    lines.append(f"runs                 {len(info['runs'])}, {pages} pages ({_size(pages << PAGE_SHIFT)})")
    lines.append(f"  {'#':>3}  {'BasePage':>12}  {'PageCount':>12}  {'physical bytes':<32}  {'size':>10}")
    for i, run in enumerate(info["runs"]):
        base, count = run["BasePage"], run["PageCount"]
        span = f"{base << PAGE_SHIFT:#x}-{((base + count) << PAGE_SHIFT) - 1:#x}"
        lines.append(f"  {i:>3}  {base:>#12x}  {count:>#12x}  {span:<32}  {_size(count << PAGE_SHIFT):>10}")
    return "\n".join(lines)
