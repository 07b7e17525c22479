"""The byte stream of one GDB remote-protocol connection: requests out, replies out of a receive
buffer, acks owed, replies in flight, and the resynchronization after an interrupted exchange."""

from __future__ import annotations

import contextlib
import logging
import re
import select
import socket
import time
from collections.abc import Iterator

from ..errors import SourceError
from .rsppacket import checksum, decode, frame

log = logging.getLogger(__name__)

#: ``m`` requests kept in flight by a pipelined read (:mod:`rspmemory`).
READ_WINDOW = 64

#: A stop reply (``T05thread:01;``, ``S05``): QEMU sends one unasked when attaching stops a running VM.
STOP_REPLY = re.compile(rb"[TS][0-9a-fA-F]{2}")

#: PacketSize assumed when the stub does not say (the protocol's historical 400 bytes).
DEFAULT_PACKET_SIZE = 400

#: Bytes a reply may take beyond a window of ``m`` replies before we give up on it ever ending.
REPLY_SLACK = 64 << 10

#: After an interrupted exchange, the stub has answered everything once it is this long silent (s).
QUIET_SECONDS = 0.25

#: And it must fall silent within this long (s).
RESYNC_SECONDS = 2.0


class RspWire:
    """One connection's bytes; every failure is a one-line SourceError naming ``gdb://host:port``.

    QEMU's stub (7.2) has no ``QStartNoAckMode``: it acks each request with ``+`` and ignores our
    acks, so acks for replies ride along with the next requests. ``pending`` counts replies to
    requests sent and not read yet, ``acks`` replies read and not acked yet; both are public to the
    pipelined reader, which parses ``received`` in place.
    """

    def __init__(self, connection: socket.socket, address: str, timeout: float) -> None:
        self.socket = connection
        self.address = address
        self.timeout = timeout
        self.received = bytearray()
        self.pending = 0
        self.acks = 0
        self.no_ack = False
        self.packet_size = DEFAULT_PACKET_SIZE
        #: Whether the stub has answered anything yet (a silent one may be busy with a debugger).
        self.negotiated = False
        #: Whether the VM was running when we attached: QEMU then sends an unasked stop reply
        #: before any other, so it is known once the first request has been answered.
        self.stopped_running_vm = False
        #: Whether an exchange was interrupted midway, so the two counts above cannot be trusted.
        self._out_of_step = False
        #: Why the connection is unusable (lost, silent, garbled): later requests fail with it at once.
        self._broken: str | None = None

    def fail(self, message: str) -> SourceError:
        """The error for a connection that cannot be used again, kept so later requests fail at once
        (and closing does not wait a timeout again) instead of reading garbage."""
        self._broken = message
        return SourceError(message)

    @contextlib.contextmanager
    def exchange(self) -> Iterator[None]:
        """Mark the connection out of step when anything but a SourceError (Ctrl-C above all) leaves
        the exchange midway: the counts of replies in flight and acks owed may then be wrong, and
        :meth:`ready` resynchronizes before the next request."""
        try:
            yield
        except SourceError:
            raise
        except BaseException:
            self._out_of_step = True
            # The interrupted frame, alive in the traceback, may hold numpy views of the receive
            # buffer, which cannot be resized while viewed: resynchronize on a copy.
            self.received = bytearray(self.received)
            raise

    def send(self, data: bytes) -> None:
        if self.acks and not self.no_ack:
            data = b"+" * self.acks + data
        self.acks = 0
        try:
            self.socket.sendall(data)
        except TimeoutError:
            raise self.fail(f"gdb://{self.address}: the stub stopped accepting data for {self.timeout:g} s") from None
        except OSError as error:
            raise self.fail(f"gdb://{self.address}: connection lost: {error.strerror or error}") from None

    def request(self, payload: bytes, *, stop_reply: bool = False) -> bytes:
        """Send one packet and return its reply (a stop reply too when ``stop_reply``)."""
        self.ready()
        self.pending += 1
        log.debug("gdb://%s <- %r", self.address, payload[:64])
        self.send(frame(payload))
        reply = self.next_reply(stop_reply)
        log.debug("gdb://%s -> %r", self.address, reply[:64])
        return reply

    @property
    def max_reply(self) -> int:
        """Bytes a reply may take before it is given up on: twice a window of ``m`` replies and slack."""
        return 2 * self.packet_size * READ_WINDOW + REPLY_SLACK

    def receive_more(self) -> None:
        """Append what the stub sent next; called only while no complete reply is buffered, so the
        buffer holds one unfinished reply, whose size is bounded here."""
        if len(self.received) > self.max_reply:
            raise self.fail(f"gdb://{self.address}: a reply ran past {self.max_reply} bytes without ending: "
                            "not QEMU's gdbstub, or a broken one")
        try:
            chunk = self.socket.recv(1 << 20)
            # QEMU's socket keeps Nagle on: it holds each small reply until our ACK comes, and a
            # delayed ACK costs up to 40 ms. Quick-ack mode resets itself, so ask again each time.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except TimeoutError:
            hint = "" if self.negotiated else " (is another debugger attached? QEMU serves one client at a time)"
            raise self.fail(f"gdb://{self.address}: no reply from the stub within {self.timeout:g} s{hint}") from None
        except OSError as error:
            raise self.fail(f"gdb://{self.address}: connection lost: {error.strerror or error}") from None
        if not chunk:
            raise self.fail(f"gdb://{self.address}: the stub closed the connection")
        self.received += chunk

    def packet_bounds(self, position: int) -> tuple[int, int] | None:
        """Indexes of the ``$`` and ``#`` of the next complete packet at or after ``position``, or None.

        Only acks may precede it; a ``-`` (the stub asking for a retransmit) is an error, because
        our packets are framed correctly and a retransmit would reorder pipelined requests.
        """
        buffer = self.received
        start = buffer.find(b"$", position)
        junk = buffer[position:] if start < 0 else buffer[position:start]
        if junk.strip(b"+"):
            if b"-" in junk:
                raise self.fail(f"gdb://{self.address}: the stub rejected a packet checksum")
            raise self.fail(f"gdb://{self.address}: unexpected bytes between packets: {bytes(junk[:16])!r}")
        if start < 0:
            return None
        end = buffer.find(b"#", start)
        if end < 0 or end + 3 > len(buffer):
            return None
        return start, end

    def _check(self, start: int, end: int) -> None:
        buffer = self.received
        try:
            expected = int(buffer[end + 1 : end + 3], 16)
        except ValueError:
            raise self.fail(f"gdb://{self.address}: malformed packet checksum "
                            f"{bytes(buffer[end + 1 : end + 3])!r}") from None
        if checksum(buffer[start + 1 : end]) != expected:
            raise self.fail(f"gdb://{self.address}: reply with a bad checksum")

    def next_reply(self, stop_reply: bool = False) -> bytes:
        """The next reply's decoded payload, skipping stop notifications unless ``stop_reply``."""
        while True:
            while (bounds := self.packet_bounds(0)) is None:
                self.receive_more()
            start, end = bounds
            self._check(start, end)
            body = self.received[start + 1 : end]
            del self.received[: end + 3]
            self.acks += 1
            self.negotiated = True
            if stop_reply or not STOP_REPLY.match(body):
                self.pending -= 1
                return decode(body, f"gdb://{self.address}")
            self.stopped_running_vm = True

    def ready(self) -> None:
        """Make the connection ready for a request: replies to requests an interrupted pipeline
        left in flight read and dropped, after an interrupted exchange whatever the stub sends."""
        if self._broken is not None:
            raise SourceError(self._broken)
        if self._out_of_step:
            self.resynchronize()
        while self.pending > 0:
            self.next_reply()

    def lose_step(self) -> None:
        """Say the stub may send replies no count knows of (a garbled ``O`` packet)."""
        self._out_of_step = True

    def resynchronize(self) -> None:
        """After an interrupted exchange: drop whatever the stub sends until it falls quiet.

        The stub has answered every request it received by then; the counts of replies in flight
        cannot be trusted, so none is used. A stub that keeps talking, or one that asks for a
        retransmit (our request was cut midway), leaves the connection broken. ``select`` waits,
        as the socket's own timeout cannot change: it may be a duplicate of gdb's.
        """
        log.debug("gdb://%s: resynchronizing after an interrupted exchange", self.address)
        deadline = time.monotonic() + RESYNC_SECONDS
        while select.select([self.socket], [], [], QUIET_SECONDS)[0]:
            if time.monotonic() > deadline:
                raise self.fail(f"gdb://{self.address}: the stub did not fall quiet within {RESYNC_SECONDS:g} s "
                                "after an interruption")
            self.receive_more()
            self._drop_replies()
        self._drop_replies()
        if self.received.strip(b"+"):
            raise self.fail(f"gdb://{self.address}: the stub left a reply unfinished after an interruption")
        self.received.clear()
        self.pending = 0
        self._out_of_step = False

    def _drop_replies(self) -> None:
        """Drop every complete packet in the receive buffer (remembering stop replies), owing an ack for each."""
        position = 0
        while bounds := self.packet_bounds(position):
            if STOP_REPLY.match(self.received, bounds[0] + 1):
                self.stopped_running_vm = True
            position = bounds[1] + 3
            self.acks += 1
        del self.received[:position]

    def settle(self) -> None:
        """Leave the connection quiet: replies in flight read and dropped, every reply acked.

        For a connection shared with another client (gdb's), which must find no stray bytes.
        """
        with self.exchange():
            self.ready()
            if self.acks and not self.no_ack:
                self.send(b"")

    def close(self) -> None:
        self.socket.close()
