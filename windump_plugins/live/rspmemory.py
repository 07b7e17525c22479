"""Memory reads with many ``m`` requests in flight on one gdbstub connection: one ``m`` carries at
most PacketSize/2 bytes, and a round trip per packet is what makes gdb's own ``dump memory`` slow."""

from __future__ import annotations

import binascii
import logging

import numpy as np

from ..errors import SourceError
from .rsppacket import HEX_VALUE, decode, read_request
from .rspwire import READ_WINDOW, RspWire

log = logging.getLogger(__name__)


class PipelinedReads:
    """Guest memory through ``m`` requests on ``wire``, :data:`READ_WINDOW` of them in flight.

    Replies are parsed in the wire's receive buffer, a buffer-full at a time: checksums summed with
    numpy, hex decoded by ``binascii``. An interrupted read leaves replies in flight; the wire
    drops them before its next request.
    """

    def __init__(self, wire: RspWire) -> None:
        self.wire = wire

    @property
    def max_read(self) -> int:
        """Bytes per ``m``: the largest power of two whose hex reply fits in PacketSize."""
        return 1 << ((self.wire.packet_size // 2).bit_length() - 1)

    def readinto(self, address: int, buffer: memoryview | bytearray) -> None:
        """Fill ``buffer`` from ``address`` (physical in PhyMemMode 1, else through the current vCPU)."""
        wire = self.wire
        with wire.exchange():
            view = memoryview(buffer).cast("B")
            size = self.max_read
            offsets = range(0, len(view), size)
            wire.ready()
            log.debug("gdb://%s: %d m requests for %#x+%#x", wire.address, len(offsets), address, len(view))
            sent = done = 0
            while done < len(offsets):
                if sent - done <= READ_WINDOW // 2 and sent < len(offsets):
                    batch = offsets[sent : done + READ_WINDOW]
                    requests = b"".join(read_request(address + o, min(size, len(view) - o)) for o in batch)
                    wire.pending += len(batch)  # before sending: an interrupted send leaves the count high, not low
                    wire.send(requests)
                    sent += len(batch)
                parsed = self._parse_memory_replies(view, offsets, done, sent, address)
                if not parsed:
                    wire.receive_more()
                done += parsed

    def _parse_memory_replies(self, view: memoryview, offsets: range, done: int, sent: int, address: int) -> int:
        """Decode every complete ``m`` reply in the receive buffer into ``view``; returns how many."""
        return self._parse_full_replies(view, offsets, done, sent) or self._parse_replies_one_by_one(
            view, offsets, done, sent, address
        )

    def _parse_full_replies(self, view: memoryview, offsets: range, done: int, sent: int) -> int:
        """The common case in one go: the buffer starts with replies that each carry a whole
        ``max_read`` of plain hex, so they lie at a fixed stride and decode as one block.

        Returns 0, consuming nothing, when the buffer does not start so (a short last reply, an
        error, run lengths, a stop notification): the one-by-one parser then takes over.
        """
        wire = self.wire
        size = offsets.step
        full = min(sent, len(view) // size) - done  # replies in flight that carry a whole ``size``
        prefix = 0 if wire.no_ack else 1  # QEMU acks each request just before answering it
        stride = prefix + 1 + 2 * size + 3
        count = min(full, len(wire.received) // stride)
        if count <= 0:
            return 0
        frames = np.frombuffer(wire.received, dtype=np.uint8, count=count * stride).reshape(count, stride)
        digits = frames[:, prefix + 1 : stride - 3]
        regular = (
            (frames[:, :prefix] == ord("+")).all()
            and (frames[:, prefix] == ord("$")).all()
            and (frames[:, stride - 3] == ord("#")).all()
            and not (digits == ord("*")).any()
        )
        if regular:
            sums = digits.sum(axis=1, dtype=np.uint8)  # wraps: exactly the sum mod 256
            stated = HEX_VALUE[frames[:, stride - 2]] * 16 + HEX_VALUE[frames[:, stride - 1]]
            regular = bool((sums == stated).all())
            try:
                data = binascii.a2b_hex(np.ascontiguousarray(digits).data) if regular else b""
            except binascii.Error:  # not hex: the one-by-one parser names the address
                regular = False
        del frames, digits  # the bytearray cannot shrink while numpy views it
        if not regular:
            return 0
        view[offsets[done] : offsets[done] + count * size] = data
        del wire.received[: count * stride]
        wire.pending -= count
        wire.acks += count
        return count

    def _parse_replies_one_by_one(self, view: memoryview, offsets: range, done: int, sent: int, address: int) -> int:
        """Decode each complete ``m`` reply in the receive buffer, whatever its form."""
        wire = self.wire
        spans: list[tuple[int, int]] = []
        position = 0
        while done + len(spans) < sent and (bounds := wire.packet_bounds(position)):
            if wire.received[bounds[0] + 1] in b"TS":  # a stop notification: hex never starts so
                wire.stopped_running_vm = True
                wire.acks += 1
            else:
                spans.append(bounds)
            position = bounds[1] + 3
        if not spans:
            del wire.received[:position]
            return 0
        starts, ends = np.array(spans, dtype=np.int64).T
        raw = np.frombuffer(wire.received, dtype=np.uint8)
        cuts = np.stack([starts + 1, ends], axis=1).ravel()
        sums = np.add.reduceat(raw, cuts, dtype=np.uint8)[::2]  # wraps: exactly the sum mod 256
        sums = np.where(ends > starts + 1, sums, 0)
        stated = HEX_VALUE[raw[ends + 1]] * 16 + HEX_VALUE[raw[ends + 2]]  # above 0xff: not hex
        del raw  # the bytearray cannot shrink while numpy views it
        try:
            indices = range(done, done + len(spans))
            for (start, end), total, expected, index in zip(spans, sums.tolist(), stated.tolist(), indices):
                if expected > 0xFF:
                    raise wire.fail(f"gdb://{wire.address}: malformed packet checksum "
                                    f"{bytes(wire.received[end + 1 : end + 3])!r}")
                if expected != total:
                    raise wire.fail(f"gdb://{wire.address}: reply with a bad checksum")
                self._read_reply(wire.received[start + 1 : end], view, offsets[index], address)
        finally:  # every complete reply is consumed, failing or not, so the connection stays in step
            del wire.received[:position]
            wire.pending -= len(spans)
            wire.acks += len(spans)
        return len(spans)

    def _read_reply(self, body: bytes | bytearray, view: memoryview, offset: int, address: int) -> None:
        """Decode one ``m`` reply's body into ``view`` at ``offset``; SourceError names what it was for."""
        length = min(self.max_read, len(view) - offset)
        try:
            if len(body) != 2 * length or b"*" in body or b"}" in body:
                body = decode(body, f"gdb://{self.wire.address}")
            view[offset : offset + length] = binascii.a2b_hex(body)
        except (ValueError, SourceError):  # binascii.Error is a ValueError; also a wrong length
            reply = body.decode("ascii", "replace")[:20]
            raise SourceError(
                f"gdb://{self.wire.address}: cannot read {length:#x} bytes at {address + offset:#x}: "
                f"the stub answered {reply!r}"
            ) from None
