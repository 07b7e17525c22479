"""The ``sample:`` source: the built-in model of a crashed Windows x64 guest, for tests and demos.

``sample:`` opens the default model; options follow as a query string, e.g.
``sample:?cpus=4&encoded&ram=5G``. The older ``sample:cpus=4,encoded`` still works, with a warning.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import SourceError, WindumpWarning
from ..guest.model import CrashedGuest, pc_ram
from ..hookspecs import SourceKind, hookimpl
from ..location import Option, integer, parse_options
from ..source import Access, CpuState, MemorySource

SCHEME = "sample:"

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text: str) -> int:
    """``256M``, ``5G``, ``4096K`` or a plain number of bytes."""
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {unit!r} (use K, M or G)")
    return integer(text[:len(text) - len(unit)]) * _SIZE_UNITS[unit]


def _pc_ram(text: str) -> tuple[tuple[int, int], ...]:
    return pc_ram(_size(text))


def _bugcheck_code(text: str) -> int:
    """A 32-bit bug-check code, as KiBugcheckData holds it."""
    code = integer(text)
    if not 0 <= code <= 0xFFFFFFFF:
        raise ValueError("a bug-check code is 32 bits, 0 to 0xffffffff")
    return code


#: The options of a ``sample:`` location; each value is a keyword argument of CrashedGuest.
OPTIONS = (
    Option("cpus", "vCPUs of the model, 1 to 8", type=integer, metavar="N", default="2"),
    Option("encoded", "keep the KDBG encoded, as Windows 8 and later do", keyword="encoded_kdbg"),
    Option("ram", "RAM laid out as QEMU's pc machine gives it, e.g. 256M or 5G; by default a small layout of "
           "the model's own", type=_pc_ram, metavar="SIZE"),
    Option("bugcheck", "the bug-check code in KiBugcheckData, 0 for none recorded", type=_bugcheck_code, metavar="CODE",
           default="0xE2", keyword="bugcheck_code"),
)

LEGACY_SYNTAX_MESSAGE = "{location}: options after sample: are a query string now: write sample:?{query}"


def open_sample(location: str) -> SampleSource:
    """The source a ``sample:?OPTIONS`` location names (SourceError for an unknown or bad option)."""
    query = location[len(SCHEME):]
    if query and not query.startswith("?"):  # sample:cpus=4,encoded, from before options were queries
        query = query.replace(",", "&")
        warnings.warn(LEGACY_SYNTAX_MESSAGE.format(location=location, query=query), WindumpWarning, stacklevel=2)
    arguments = parse_options(location, query.removeprefix("?"), OPTIONS)
    try:
        guest = CrashedGuest(**{keyword: value for keyword, value in arguments.items() if value is not None})
    except ValueError as error:
        raise SourceError(f"{location}: {error}") from None
    return SampleSource(guest, location)


class SampleSource(MemorySource):
    """A :class:`~windump_plugins.guest.model.CrashedGuest` served as a memory source."""

    def __init__(self, guest: CrashedGuest, description: str = SCHEME) -> None:
        self.guest = guest
        self.description = description

    @property
    def ram(self) -> np.ndarray:
        return self.guest.ram

    def readinto(self, address: int, buffer: memoryview) -> None:
        self.guest.readinto(address, buffer)

    def vmcoreinfo(self) -> bytes:
        return self.guest.note

    def cpus(self) -> list[CpuState]:
        return [CpuState(state.index, dict(state.registers)) for state in self.guest.cpu_states]

    def access(self) -> Access:
        return Access("model")


@hookimpl
def windump_open_location(location: str) -> SampleSource | None:
    return open_sample(location) if location.startswith(SCHEME) else None


@hookimpl
def windump_source_kinds() -> list[SourceKind]:
    return [SourceKind(f"{SCHEME}[?OPTIONS]", "a built-in model of a crashed Windows x64 guest", OPTIONS)]
