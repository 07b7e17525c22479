"""The dump header a guest published in its VMCOREINFO note, checked and patched as QEMU's ``dump/win_dump.c`` does.

QEMU 7.2 (``create_win_dump``) checks the note size and the header magic, finds a readable KDBG
(falling back to the decoded copy the guest driver left in BugCheckParameter1), then patches
RequiredDumpSpace, two padding fields, PfnDatabase and the bug-check data. :func:`prepare_header`
does the same on a copy, without writing to the guest (each vCPU's KPRCB context is an overlay of
the save pipeline). It is windump's built-in ``windump_dump_header`` implementation, the method
``published``, registered as the plugin of that name.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import FormatError, WindumpError, WindumpWarning
from ..formats import dumpheader as fmt
from ..formats.kdbg import KDDEBUGGER_DATA64, OWNER_TAG
from ..formats.vmcoreinfo import NOTE_HEADER_SIZE
from ..hookspecs import HeaderCandidate, hookimpl
from ..paging import X86_64, AddressSpace
from ..runs import check_runs
from ..source import MemorySource

#: This method's name among the header candidates (``windump_dump_header``).
METHOD = "published"

#: The four bug-check words QEMU copies (code, then parameters 1-4), each pointer-sized.
BUGCHECK_WORDS = 5


_OWNER_TAG_OFFSET = fmt.field_offset(KDDEBUGGER_DATA64, "OwnerTag")
_MM_PFN_DATABASE_OFFSET = fmt.field_offset(KDDEBUGGER_DATA64, "MmPfnDatabase")
_KI_BUGCHECK_DATA_OFFSET = fmt.field_offset(KDDEBUGGER_DATA64, "KiBugcheckData")

NO_NOTE_MESSAGE = (
    "the guest published no VMCOREINFO note: is `-device vmcoreinfo` on the QEMU command line and the "
    "fwcfg driver running in the guest? (see docs: QEMU set-up)"
)


def prepare_header(source: MemorySource) -> HeaderCandidate:
    """Check and patch the header ``source``'s guest published, as QEMU 7.2's ``dump-guest-memory -w``.

    Raises WindumpError (FormatError for a malformed note or header) where QEMU fails; warns with
    :class:`WindumpWarning` and keeps going where QEMU only warns.
    """
    note = source.vmcoreinfo()
    if note is None:
        raise WindumpError(NO_NOTE_MESSAGE)
    header_format, header = _parse_note(note)
    if header_format is not fmt.X64:
        raise WindumpError(
            f"32-bit guests are not supported yet: the VMCOREINFO note holds a "
            f"PAGE/{header_format.valid_dump.decode()} dump header"
        )
    address_space = AddressSpace(source, int(header["DirectoryTableBase"]), X86_64)
    kdbg_address = _find_kdbg(header, address_space)
    header["KdDebuggerDataBlock"] = kdbg_address
    _patch_header(header, header_format, address_space, kdbg_address)

    runs = fmt.header_runs(header)
    check_runs(runs, source.ram, max_runs=header_format.max_runs)
    number_of_pages = int(header["PhysicalMemoryBlock"]["NumberOfPages"])
    if number_of_pages != int(runs[:, 1].sum()):
        raise FormatError(
            f"PhysicalMemoryBlock.NumberOfPages is {number_of_pages:#x} but its runs hold "
            f"{int(runs[:, 1].sum()):#x} pages"
        )
    return HeaderCandidate(METHOD, header_format, header, runs, kdbg_address, address_space)


def _parse_note(note: bytes) -> tuple[fmt.HeaderFormat, np.ndarray]:
    """The header in the note, after QEMU's size and magic checks (and ours: size matching magic)."""
    sizes = {f.name: NOTE_HEADER_SIZE + f.size for f in fmt.HEADER_FORMATS}
    if len(note) not in sizes.values():
        expected = " or ".join(f"{size:#x} ({name})" for name, size in sizes.items())
        raise FormatError(
            f"win-dump: invalid vmcoreinfo note size: the guest's note is {len(note):#x} bytes, expected {expected}"
        )
    data = note[NOTE_HEADER_SIZE:]
    header_format = fmt.header_format(data)
    if len(data) != header_format.size:
        raise FormatError(
            f"the VMCOREINFO note holds a PAGE/{header_format.valid_dump.decode()} dump header but is "
            f"{len(note):#x} bytes, expected {sizes[header_format.name]:#x}"
        )
    return fmt.parse_header(data)


def _read_owner_tag(address_space: AddressSpace, kdbg_address: int) -> bytes | str:
    """KDBG's OwnerTag at ``kdbg_address``, or why it cannot be read."""
    try:
        return address_space.read(kdbg_address + _OWNER_TAG_OFFSET, len(OWNER_TAG))
    except WindumpError as error:
        return f"unreadable: {error}"


def _find_kdbg(header: np.ndarray, address_space: AddressSpace) -> int:
    """The address of a plaintext KDBG: KdDebuggerDataBlock, else the driver's decoded copy.

    Windows 8+ keeps KdDebuggerDataBlock encoded; the fwcfg driver stores the address of a decoded
    copy in BugCheckParameter1, where QEMU looks next (QEMU gives up when the first read faults;
    we look at the copy then too).
    """
    candidates = {
        "KdDebuggerDataBlock": int(header["KdDebuggerDataBlock"]),
        "BugCheckParameter1": int(header["BugCheckParameter1"]),
    }
    found = {}
    for field, address in candidates.items():
        found[field] = _read_owner_tag(address_space, address)
        if found[field] == OWNER_TAG:
            return address

    def reads(field: str) -> str:
        tag = found[field]
        shown = f"reads {tag!r}" if isinstance(tag, bytes) else f"is {tag}"
        return f"{field} {candidates[field]:#x} (OwnerTag {shown})"

    raise WindumpError(
        f"no KDBG block: {reads('KdDebuggerDataBlock')} seems to be encrypted, and "
        f"{reads('BugCheckParameter1')} holds no decoded copy"
    )


def _patch_header(
    header: np.ndarray, header_format: fmt.HeaderFormat, address_space: AddressSpace, kdbg_address: int
) -> None:
    """QEMU's ``patch_header``: sizes and pads, then PfnDatabase and bug-check data (warn on failure)."""
    block = header["PhysicalMemoryBlock"]
    header["RequiredDumpSpace"] = header_format.size + int(block["NumberOfPages"]) * fmt.PAGE_SIZE
    block["Unused"] = 0
    header["DumpTypePad"] = 0

    try:
        header["PfnDatabase"] = address_space.read_u64(kdbg_address + _MM_PFN_DATABASE_OFFSET)
    except WindumpError as error:
        warnings.warn(
            f"win-dump: failed to read MmPfnDatabase at KDBG + {_MM_PFN_DATABASE_OFFSET:#x} ({error}); "
            f"PfnDatabase keeps the guest's {int(header['PfnDatabase']):#x}",
            WindumpWarning,
            stacklevel=3,
        )

    try:
        ki_bugcheck_data = address_space.read_u64(kdbg_address + _KI_BUGCHECK_DATA_OFFSET)
    except WindumpError as error:
        _warn_bugcheck(f"failed to read KiBugcheckData at KDBG + {_KI_BUGCHECK_DATA_OFFSET:#x} ({error})")
        return
    try:
        words = np.frombuffer(address_space.read(ki_bugcheck_data, 8 * BUGCHECK_WORDS), dtype="<u8")
    except WindumpError as error:
        _warn_bugcheck(f"failed to read bugcheck data at KiBugcheckData {ki_bugcheck_data:#x} ({error})")
        return
    # QEMU copies the 40 bytes over BugCheckCode, its pad and the parameters as they lie.
    header["BugCheckCode"] = int(words[0]) & 0xFFFF_FFFF
    header["BugCheckCodePad"] = int(words[0]) >> 32
    for n in range(1, BUGCHECK_WORDS):
        header[f"BugCheckParameter{n}"] = words[n]
    if header["BugCheckCode"] == 0:  # no bug check recorded: the guest was alive
        header["BugCheckCode"] = fmt.LIVE_SYSTEM_DUMP


def _warn_bugcheck(reason: str) -> None:
    warnings.warn(f"win-dump: {reason}; the bug-check code and parameters keep the guest's values",
                  WindumpWarning, stacklevel=4)


@hookimpl
def windump_dump_header(source: MemorySource) -> HeaderCandidate:
    """The header the guest published, as :func:`prepare_header` makes it."""
    return prepare_header(source)
