"""GDB remote-protocol packets on the wire: checksums, escapes, framing, and decoding replies with
their escapes and run lengths."""

from __future__ import annotations

import numpy as np

from ..errors import SourceError

#: Bytes that must be escaped inside a packet: ``}`` then the byte XOR 0x20.
_ESCAPED = frozenset(b"$#}*")

#: ASCII code -> value of a hex digit (0x100, never a checksum, for anything else).
HEX_VALUE = np.full(256, 0x100, dtype=np.uint16)
for _digit in b"0123456789abcdefABCDEF":
    HEX_VALUE[_digit] = int(chr(_digit), 16)


def checksum(payload: bytes | bytearray) -> int:
    """The packet checksum: the sum of the payload bytes modulo 256."""
    return sum(payload) & 0xFF


def escape(payload: bytes) -> bytes:
    """``payload`` with ``$ # } *`` escaped as ``}`` and the byte XOR 0x20."""
    if not _ESCAPED.intersection(payload):
        return payload
    out = bytearray()
    for byte in payload:
        if byte in _ESCAPED:
            out += bytes((0x7D, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``$payload#cs``: one packet ready for the wire, escaped."""
    body = escape(payload)
    return b"$%s#%02x" % (body, checksum(body))


def read_request(address: int, length: int) -> bytes:
    """The framed ``m`` packet for ``length`` bytes at ``address`` (hex digits need no escapes)."""
    body = b"m%x,%x" % (address, length)
    return b"$%s#%02x" % (body, sum(body) & 0xFF)


def decode(body: bytes | bytearray, origin: str = "gdbstub") -> bytes:
    """A received packet body with escapes undone and run lengths (``X*n``: ``n - 29`` more ``X``)
    expanded; ``origin`` starts the message of a body cut inside either."""
    if b"}" not in body and b"*" not in body:
        return bytes(body)
    out = bytearray()
    i = 0
    while i < len(body):
        byte = body[i]
        if byte in b"}*" and i + 1 == len(body):
            raise SourceError(f"{origin}: reply ends inside an escape or run length")
        if byte == 0x7D:
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif byte == 0x2A:
            if not out:
                raise SourceError("gdbstub reply starts with a run-length marker: not a valid packet")
            out += bytes((out[-1],)) * (body[i + 1] - 29)
            i += 2
        else:
            out.append(byte)
            i += 1
    return bytes(out)
