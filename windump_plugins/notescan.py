"""A scan of guest RAM for the VMCOREINFO note, for sources that cannot ask QEMU where the guest
published it (a gdbstub, a raw memory image)."""

from __future__ import annotations

import numpy as np

from .formats.vmcoreinfo import NOTE_ID_SIZE, find_notes, parse_note
from .source import MemorySource

#: RAM read per step when scanning for the note.
SCAN_CHUNK = 16 << 20


def scan_for_note(source: MemorySource, chunk_size: int | None = None) -> tuple[int, bytes] | None:
    """The physical address and bytes of the first whole VMCOREINFO note in ``source``'s RAM, or
    None; RAM is read ``chunk_size`` (default :data:`SCAN_CHUNK`) bytes at a time from the bottom,
    stopping at the first note."""
    chunk_size = chunk_size or SCAN_CHUNK
    chunk = np.empty(chunk_size, dtype=np.uint8)
    for start, end in source.ram.tolist():
        position = start
        while True:
            length = min(chunk_size, end - position)
            source.readinto(position, chunk[:length].data)
            for found in find_notes(chunk[:length]):
                address = position + found
                size = parse_note(chunk[found : found + NOTE_ID_SIZE].tobytes())
                if size is not None and address + size <= end:
                    return address, source.read(address, size)
            if position + length >= end:
                break
            position += length - NOTE_ID_SIZE  # a note cut by the chunk's end is seen whole in the next
    return None
