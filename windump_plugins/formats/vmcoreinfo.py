"""The VMCOREINFO note a Windows guest's fwcfg driver publishes: its layout, and a vectorised search
for it in a chunk of memory.

The note is a 24-byte ELF note header (namesz 11, descsz, type 0, "VMCOREINFO" padded to 12) and
then the dump header: ``PAGE`` ``DU64`` (descsz 0x2000) or ``PAGE`` ``DUMP`` (descsz 0x1000).
"""

from __future__ import annotations

import numpy as np

from .dumpheader import SIGNATURE, VALID_DUMP32, VALID_DUMP64

NOTE_NAME = b"VMCOREINFO\0\0"
NOTE_HEADER_SIZE = 24
_NOTE_WORDS = np.frombuffer(NOTE_NAME, dtype="<u4")

#: Dump-header size for each ValidDump magic the note may carry.
NOTE_DESC_SIZES = {VALID_DUMP64: 0x2000, VALID_DUMP32: 0x1000}

#: Bytes that identify a note: its header and the dump header's two magic words.
NOTE_ID_SIZE = NOTE_HEADER_SIZE + 8


def parse_note(data: bytes) -> int | None:
    """The total size (24 + header) of the VMCOREINFO note at the start of ``data``, or None.

    The note carries a Windows dump header: ``PAGE`` then ``DU64`` (0x2000 bytes) or ``DUMP`` (0x1000).
    """
    if len(data) < NOTE_ID_SIZE:
        return None
    namesz, descsz, kind = np.frombuffer(data, dtype="<u4", count=3).tolist()
    magic = bytes(data[NOTE_HEADER_SIZE : NOTE_ID_SIZE])
    if (namesz, kind, bytes(data[12:24]), magic[:4]) != (11, 0, NOTE_NAME, SIGNATURE):
        return None
    if NOTE_DESC_SIZES.get(magic[4:]) != descsz:
        return None
    return NOTE_HEADER_SIZE + descsz


def find_notes(chunk: np.ndarray) -> list[int]:
    """Offsets of the VMCOREINFO note headers (with a dump header's magic) in ``chunk``, a uint8
    array read from a 4-byte aligned address; only notes whose first 32 bytes lie in ``chunk``.

    Vectorised: finds the rare "VMCO" word, then checks namesz, type and the rest in Python.
    """
    words = chunk[: len(chunk) // 4 * 4].view("<u4")
    count = len(words) - NOTE_ID_SIZE // 4 + 1
    if count <= 0:
        return []
    candidates = np.flatnonzero(words[3 : 3 + count] == _NOTE_WORDS[0])
    candidates = candidates[(words[candidates] == 11) & (words[candidates + 2] == 0)]
    return [4 * index for index in candidates.tolist()
            if parse_note(chunk[4 * index : 4 * index + NOTE_ID_SIZE].tobytes())]
