"""The header fields the guest's driver captured at boot, taken fresh when the dump is written: time
and uptime from KUSER_SHARED_DATA, the processor count, the header CONTEXT and exception record
from a vCPU, and a Comment naming windump; "PAGE" filler is cleared from the fields readers use.

QEMU's ``-w`` leaves all of these as the driver captured them (``docs/header-fields.rst``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

from . import __version__
from .errors import WindumpError, WindumpWarning
from .formats.context import context_from_registers
from .formats.dumpheader import EXCEPTION_RECORD64, PAGE_FILLER
from .formats.kuser import (
    KSYSTEM_TIME,
    KUSER_INTERRUPT_TIME,
    KUSER_NT_PRODUCT_TYPE,
    KUSER_SHARED_DATA,
    KUSER_SUITE_MASK,
    KUSER_SYSTEM_TIME,
)
from .paging import AddressSpace

#: Reads of a KSYSTEM_TIME before a live guest's clock is taken as torn.
KSYSTEM_TIME_ATTEMPTS = 8

#: The exception the header records: a breakpoint (STATUS_BREAKPOINT) at the context's RIP, as when
#: a debugger breaks in.
STATUS_BREAKPOINT = 0x80000003

#: u32 fields readers show that the driver may leave holding the filler: zeroed when they do.
FILLER_FIELDS = ("MiniDumpFields", "SecondaryDataState", "WriterStatus", "Attributes", "BootId")

#: The Comment's bytes (the last of its 128 stays NUL).
COMMENT_SIZE = 127


def _warn(message: str) -> None:
    warnings.warn(message, WindumpWarning, stacklevel=3)


def read_ksystem_time(space: AddressSpace, address: int) -> int:
    """The 64-bit value of the KSYSTEM_TIME at ``address``, read until its two high parts agree.

    Raises WindumpError when it cannot be read or stays torn.
    """
    for _ in range(KSYSTEM_TIME_ATTEMPTS):
        time = space.read_struct(address, KSYSTEM_TIME)
        high = int(time["High1Time"])
        if high == int(time["High2Time"]):
            return high << 32 | int(time["LowPart"])
    raise WindumpError(f"KSYSTEM_TIME at {address:#x}: High1Time {high:#x} and High2Time "
                       f"{int(time['High2Time']):#x} still disagree after {KSYSTEM_TIME_ATTEMPTS} reads")


def comment(description: str) -> bytes:
    """``windump VERSION from SOURCE``, cut to what the header's Comment holds."""
    text = f"windump {__version__} from {description or 'an unnamed source'}"
    return text.encode("utf-8", "replace")[:COMMENT_SIZE]


def breakpoint_exception(rip: int) -> np.ndarray:
    """An EXCEPTION_RECORD64 of a breakpoint at ``rip``: one parameter, 0 (BREAKPOINT_BREAK)."""
    record = np.zeros((), dtype=EXCEPTION_RECORD64)
    record["ExceptionCode"] = STATUS_BREAKPOINT
    record["ExceptionAddress"] = rip
    record["NumberParameters"] = 1
    return record


def set_header_context(header: np.ndarray, registers: Mapping[str, int]) -> None:
    """ContextRecord from ``registers`` (the rest of its 3000 bytes zero), and the breakpoint
    exception at their RIP."""
    context = context_from_registers(registers)
    record = header["ContextRecord"]
    record[:] = 0
    record[: context.nbytes] = np.frombuffer(context.tobytes(), dtype=np.uint8)
    header["Exception"] = breakpoint_exception(int(registers.get("rip", 0)))


def _clear_filler(header: np.ndarray) -> None:
    """Zero the "PAGE" filler the driver may have left in the exception record and the u32 fields
    readers show (KdSecondaryVersion and its neighbours count as one such u32)."""
    words = header["Exception"].reshape(1).view("<u4")
    words[words == PAGE_FILLER] = 0
    for name in FILLER_FIELDS:
        if int(header[name]) == PAGE_FILLER:
            header[name] = 0
    if bytes([int(header["Unused1"]), int(header["KdSecondaryVersion"]), *header["Unused2"].tolist()]) == b"PAGE":
        header["Unused1"] = header["KdSecondaryVersion"] = 0
        header["Unused2"] = 0


def _refresh_from_kuser(header: np.ndarray, space: AddressSpace) -> None:
    """SystemTime and SystemUpTime now; ProductType and SuiteMask where the driver left filler."""
    for field, offset, what in (("SystemTime", KUSER_SYSTEM_TIME, "SystemTime"),
                                ("SystemUpTime", KUSER_INTERRUPT_TIME, "InterruptTime")):
        try:
            header[field] = read_ksystem_time(space, KUSER_SHARED_DATA + offset)
        except WindumpError as error:
            kept = 0 if int(header[field]) & 0xFFFF_FFFF == PAGE_FILLER else int(header[field])
            header[field] = kept
            _warn(f"KUSER_SHARED_DATA.{what} is not readable ({error}); {field} keeps the boot-time {kept:#x}")
    for field, offset in (("ProductType", KUSER_NT_PRODUCT_TYPE), ("SuiteMask", KUSER_SUITE_MASK)):
        if int(header[field]) != PAGE_FILLER:
            continue
        try:
            header[field] = space.read_u32(KUSER_SHARED_DATA + offset)
        except WindumpError as error:
            header[field] = 0
            _warn(f"{field} holds the header's \"PAGE\" filler and KUSER_SHARED_DATA + {offset:#x} is not "
                  f"readable ({error}); it is left 0")


def freshen_header(header: np.ndarray, space: AddressSpace, *, description: str,
                   number_processors: int | None, context_registers: Mapping[str, int] | None) -> None:
    """Set the fields that describe the guest at dump time rather than at boot, in place.

    ``number_processors`` (None: keep the guest's) is the count of Windows processors found;
    ``context_registers`` (None: keep the guest's ContextRecord and exception record, filler
    cleared) are the registers of the vCPU the header's context shows.
    """
    _clear_filler(header)
    _refresh_from_kuser(header, space)
    header["Comment"] = comment(description)
    if number_processors:
        header["NumberProcessors"] = number_processors
    if context_registers is not None:
        set_header_context(header, context_registers)
