"""The ``raw:`` source: guest RAM kept byte for byte in a file, as QEMU's ``pmemsave`` or a shared
``memory-backend-file`` leaves it, with an optional RAM map and the guest's VMCOREINFO note.

``raw:PATH`` reads PATH as RAM from physical address 0. ``raw:PATH?map=MAPFILE`` places the file's
bytes by MAPFILE, one ``GUEST_PHYS_START GUEST_PHYS_END FILE_OFFSET`` line (hex) per RAM block.
``&note=NOTEFILE`` (or ``?note=`` without a map) gives the VMCOREINFO note the guest published;
without it the source scans guest RAM for the note once, when windump first asks for it.

This module uses only windump's public plugin API, all of it imported from the package's top
``windump_plugins``: ``hookimpl`` and ``SourceKind``, ``FileMap`` and ``FileMapSource`` (a
``MemorySource`` over pieces of one file), ``scan_for_note`` and the error types.
"""

from __future__ import annotations

import os

import numpy as np

from windump_plugins import FileMap, FileMapSource, FormatError, SourceError, SourceKind, hookimpl, scan_for_note

SCHEME = "raw:"

#: The options a location takes after ``?``, ``&``-separated.
OPTIONS = ("map", "note")


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
            found = scan_for_note(self)
            self._note = found[1] if found else None
        return self._note

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
