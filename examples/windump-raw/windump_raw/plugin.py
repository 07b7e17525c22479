"""The ``raw:`` source: guest RAM kept byte for byte in a file, as QEMU's ``pmemsave`` or a shared
``memory-backend-file`` leaves it, with an optional RAM map and the guest's VMCOREINFO note.

``raw:PATH`` reads PATH as RAM from physical address 0. ``raw:PATH?map=MAPFILE`` places the file's
bytes by MAPFILE, one ``GUEST_PHYS_START GUEST_PHYS_END FILE_OFFSET`` line (hex) per RAM block.
``&note=NOTEFILE`` (or ``?note=`` without a map) gives the VMCOREINFO note the guest published;
without it the source scans guest RAM for the note once, when windump first asks for it.

This module uses only windump's public plugin API: :mod:`windump_plugins.hookspecs`,
:mod:`windump_plugins.source`, :mod:`windump_plugins.filemap` and :mod:`windump_plugins.errors`.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from windump_plugins.errors import FormatError, SourceError
from windump_plugins.filemap import FileMap, FileMapSource
from windump_plugins.hookspecs import SourceKind, hookimpl
from windump_plugins.source import MemorySource

SCHEME = "raw:"

#: The options a location takes after ``?``, ``&``-separated.
OPTIONS = ("map", "note")

#: What the Windows fwcfg driver publishes: an ELF note header (namesz 11, descsz 0x2000, type 0,
#: "VMCOREINFO" padded to 12 bytes), then the 64-bit dump header, which starts "PAGEDU64".
NOTE_HEADER = struct.pack("<III", 11, 0x2000, 0) + b"VMCOREINFO\0\0"
NOTE_SIZE = len(NOTE_HEADER) + 0x2000
NOTE_SIGNATURE = NOTE_HEADER + b"PAGEDU64"
_SIGNATURE_WORDS = np.frombuffer(NOTE_SIGNATURE, dtype="<u4")
#: The signature word to look for first: "VMCO" is rare in RAM, unlike the note's small integers.
_ANCHOR = 3

#: Bytes of guest RAM read at a time while scanning for the note.
SCAN_CHUNK = 16 << 20


def read_ram_map(path: str, file_size: int) -> np.ndarray:
    """The RAM map in ``path`` as an ``(N, 3)`` uint64 array of ``[start, end, file offset]`` rows
    sorted by start; FormatError for a malformed line, overlapping blocks or a block past the file's
    ``file_size`` bytes."""
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            lines = file.read().splitlines()
    except OSError as error:
        raise SourceError(f"cannot read RAM map {path}: {error.strerror}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            start, end, offset = (int(field, 16) for field in fields)
        except ValueError:
            raise FormatError(f"{path}:{number}: expected GUEST_PHYS_START GUEST_PHYS_END FILE_OFFSET in hex, "
                              f"got {line.strip()!r}") from None
        if not 0 <= start < end < 1 << 64 or offset < 0:
            raise FormatError(f"{path}:{number}: block {start:#x}-{end:#x} at file offset {offset:#x} is empty or backwards")
        rows.append((start, end, offset))
    if not rows:
        raise FormatError(f"{path}: the RAM map lists no blocks")
    blocks = np.array(sorted(rows), dtype=np.uint64)
    overlap = np.flatnonzero(blocks[1:, 0] < blocks[:-1, 1])
    if len(overlap):
        a, b = blocks[overlap[0]], blocks[overlap[0] + 1]
        raise FormatError(f"{path}: blocks {int(a[0]):#x}-{int(a[1]):#x} and {int(b[0]):#x}-{int(b[1]):#x} overlap")
    past = np.flatnonzero(blocks[:, 2] + blocks[:, 1] - blocks[:, 0] > np.uint64(file_size))
    if len(past):
        start, end, offset = (int(v) for v in blocks[past[0]])
        raise FormatError(f"{path}: block {start:#x}-{end:#x} needs file bytes up to "
                          f"{offset + end - start:#x}, the image has {file_size:#x}")
    return blocks


def find_vmcoreinfo(source: MemorySource, chunk_size: int = SCAN_CHUNK) -> int | None:
    """Guest physical address of the first 4-byte aligned VMCOREINFO note holding a 64-bit dump
    header, scanning ``source``'s RAM ``chunk_size`` bytes at a time; None when there is none."""
    overlap = len(NOTE_SIGNATURE) - 4  # a signature across two chunks lies whole in the second
    buffer = memoryview(bytearray(chunk_size))
    for start, end in source.ram.tolist():
        address = start + -start % 4
        while end - address >= len(NOTE_SIGNATURE):
            view = buffer[:min(chunk_size, end - address) & ~3]
            source.readinto(address, view)
            words = np.frombuffer(view, dtype="<u4")
            found = np.flatnonzero(words[_ANCHOR:len(words) - len(_SIGNATURE_WORDS) + _ANCHOR + 1]
                                   == _SIGNATURE_WORDS[_ANCHOR])
            for k, word in enumerate(_SIGNATURE_WORDS):
                found = found[words[found + k] == word]
            if len(found):
                return address + 4 * int(found[0])
            address += len(view) - overlap
    return None


class RawSource(FileMapSource):
    """Guest RAM in a flat file, placed by a RAM map (or from physical 0 without one)."""

    def __init__(self, path: str, map_path: str | None = None, note_path: str | None = None,
                 description: str | None = None) -> None:
        self.description = description or SCHEME + path
        try:
            self._file = open(path, "rb", buffering=0)
        except OSError as error:
            raise SourceError(f"{self.description}: cannot open {path}: {error.strerror}") from None
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size == 0:
                raise SourceError(f"{self.description}: {path} is empty")
            blocks = (read_ram_map(map_path, size) if map_path
                      else np.array([[0, size, 0]], dtype=np.uint64))
            self._note = self._read_note(note_path) if note_path else None
        except BaseException:
            self._file.close()
            raise
        self.memory = FileMap(self._file, *blocks.T, self.description)
        self._scanned = note_path is not None

    def _read_note(self, note_path: str) -> bytes:
        try:
            with open(note_path, "rb") as file:
                return file.read()
        except OSError as error:
            raise SourceError(f"{self.description}: cannot read note file {note_path}: {error.strerror}") from None

    def vmcoreinfo(self) -> bytes | None:
        """The note from ``note=``, or else the first one found in RAM (scanned once, on demand)."""
        if not self._scanned:
            self._scanned = True
            address = find_vmcoreinfo(self)
            if address is not None:
                self._note = self.read(address, min(NOTE_SIZE, self._range_end(address) - address))
        return self._note

    def _range_end(self, address: int) -> int:
        ram = self.ram
        return int(ram[np.searchsorted(ram[:, 0], np.uint64(address), side="right") - 1, 1])

    def close(self) -> None:
        self._file.close()


def open_raw(location: str) -> RawSource:
    """The source a ``raw:PATH[?map=MAPFILE][&note=NOTEFILE]`` location names."""
    path, _, query = location[len(SCHEME):].partition("?")
    options = {}
    for option in filter(None, query.split("&")):
        name, equals, value = option.partition("=")
        if name not in OPTIONS or not equals or not value:
            raise SourceError(f"{location}: bad option {option!r}; the options are map=MAPFILE and note=NOTEFILE")
        options[name] = value
    if not path:
        raise SourceError(f"{location}: expected raw:PATH[?map=MAPFILE][&note=NOTEFILE]")
    return RawSource(path, options.get("map"), options.get("note"), description=location)


@hookimpl
def windump_open_location(location: str) -> RawSource | None:
    return open_raw(location) if location.startswith(SCHEME) else None


@hookimpl
def windump_source_kinds() -> list[SourceKind]:
    return [SourceKind("raw:PATH[?map=M&note=N]",
                       "a raw RAM image (pmemsave, memory-backend-file); M lists START END OFFSET in hex, "
                       "N holds the VMCOREINFO note (else RAM is scanned for it)")]
