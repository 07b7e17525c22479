"""The ``sample:`` source: the built-in model of a crashed Windows x64 guest, for tests and demos.

``sample:`` opens the default model; options follow the colon, separated by commas, e.g.
``sample:cpus=4,encoded,ram=5G``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import SourceError
from ..guest.model import CrashedGuest, pc_ram
from ..hookspecs import SourceKind, hookimpl
from ..source import CpuState, MemorySource

SCHEME = "sample:"

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text: str) -> int:
    """``256M``, ``5G``, ``4096K`` or a plain number of bytes."""
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {unit!r} (use K, M or G)")
    return int(text[:len(text) - len(unit)], 0) * _SIZE_UNITS[unit]


#: option name -> (what the user types, what it does, CrashedGuest keyword arguments from its value).
#: An option whose usage has no ``=`` is a bare flag and takes no value.
OPTIONS: dict[str, tuple[str, str, Callable[[str], dict]]] = {
    "cpus": ("cpus=N", "N vCPUs (1-8, default 2)", lambda value: {"cpus": int(value, 0)}),
    "encoded": ("encoded", "keep the KDBG encoded, as Windows 8 and later do",
                lambda _: {"encoded_kdbg": True}),
    "ram": ("ram=SIZE", "RAM laid out as QEMU's pc machine gives it (e.g. 256M, 5G)",
            lambda value: {"ram": pc_ram(_size(value))}),
    "bugcheck": ("bugcheck=CODE", "the bug-check code in KiBugcheckData (0: none recorded)",
                 lambda value: {"bugcheck_code": int(value, 0)}),
}


def open_sample(location: str) -> SampleSource:
    """The source a ``sample:OPTIONS`` location names (SourceError for an unknown or bad option)."""
    arguments: dict = {}
    for option in filter(None, location[len(SCHEME):].split(",")):
        name, equals, value = option.partition("=")
        if name not in OPTIONS or ("=" in OPTIONS[name][0]) != bool(equals):
            known = ", ".join(usage for usage, _, _ in OPTIONS.values())
            raise SourceError(f"{location}: unknown option {option!r}; the options are {known}")
        try:
            arguments.update(OPTIONS[name][2](value))
        except ValueError as error:
            raise SourceError(f"{location}: bad option {option!r}: {error}") from None
    try:
        guest = CrashedGuest(**arguments)
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


@hookimpl
def windump_open_location(location: str) -> SampleSource | None:
    return open_sample(location) if location.startswith(SCHEME) else None


@hookimpl
def windump_source_kinds() -> list[SourceKind]:
    options = "; ".join(f"{usage}: {summary}" for usage, summary, _ in OPTIONS.values())
    return [SourceKind(f"{SCHEME}[OPTION,...]", f"a built-in model of a crashed Windows x64 guest ({options})")]
