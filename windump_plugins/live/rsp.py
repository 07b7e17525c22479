"""A client for the GDB remote serial protocol (RSP) as QEMU's gdbstub speaks it, without a gdb binary.

It exchanges packets (framed by :mod:`rsppacket`) with acks, asks the stub what it supports, names
registers from the stub's target description (:mod:`targetxml`), runs monitor (HMP) commands with
``qRcmd``, and reads memory with many ``m`` requests in flight, since one ``m`` carries at most PacketSize/2 bytes
and a round trip per packet is what makes gdb's own ``dump memory`` slow.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import re
import select
import socket
import time
from collections.abc import Iterator

import numpy as np

from ..errors import SourceError
from .rsppacket import HEX_VALUE, checksum, decode, frame, read_request
from .targetxml import Register, parse_target_description, xml_includes

#: ``m`` requests kept in flight by :meth:`RemoteStub.readinto`.
READ_WINDOW = 64

#: A stop reply (``T05thread:01;``, ``S05``): QEMU sends one unasked when attaching stops a running VM.
_STOP_REPLY = re.compile(rb"[TS][0-9a-fA-F]{2}")

#: The thread ids of a ``qfThreadInfo`` reply after its ``m``: ``1,2`` or, multiprocess, ``p1.1,p1.2``.
_THREAD_IDS = re.compile(rb"[0-9a-fA-Fp.,-]+")

#: Socket receive buffer asked for (the kernel caps it at net.core.rmem_max).
RECEIVE_BUFFER = 4 << 20

#: PacketSize assumed when the stub does not say (the protocol's historical 400 bytes).
DEFAULT_PACKET_SIZE = 400

#: The smallest PacketSize we accept: below it not even our own queries fit.
MIN_PACKET_SIZE = 0x40

#: PacketSize larger offers are cut to (QEMU offers 0x1000; gdb itself caps at 0x4000).
MAX_PACKET_SIZE = 0x10000

#: Bytes a reply may take beyond a window of ``m`` replies before we give up on it ever ending.
REPLY_SLACK = 64 << 10

#: After an interrupted exchange, the stub has answered everything once it is this long silent (s).
QUIET_SECONDS = 0.25

#: And it must fall silent within this long (s).
RESYNC_SECONDS = 2.0


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection whose receive buffer holds a whole window of ``m`` replies.

    QEMU writes each reply synchronously and, when the socket is full, sleeps and retries: a
    buffer smaller than the replies in flight stalls it. The size is set before connecting so the
    window scale is negotiated for it.
    """
    error: OSError = OSError(f"no address for {host}")
    for family, kind, protocol, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        connection = socket.socket(family, kind, protocol)
        try:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.settimeout(timeout)
            connection.connect(address)
            return connection
        except OSError as failure:
            connection.close()
            error = failure
    raise error


def parse_supported(reply: bytes) -> dict[str, str]:
    """The features of a ``qSupported`` reply: ``name=value`` items, and ``name+``/``name-`` as ``"+"``/``"-"``."""
    features = {}
    for item in filter(None, reply.decode("ascii", "replace").split(";")):
        if "=" in item:
            name, value = item.split("=", 1)
            features[name] = value
        else:
            features[item[:-1]] = item[-1]
    return features


class QemuQueries:
    """QEMU's own gdbstub queries, for any connection that can send a packet and return its reply.

    Shared by :class:`RemoteStub` (our socket) and windump's adapter for gdb's own connection, so
    both restore ``PhyMemMode`` the same way.
    """

    #: ``host:port`` (or how gdb names its connection), for messages.
    address: str

    def command(self, payload: bytes | str) -> bytes:
        """Send one packet and return its reply."""
        raise NotImplementedError

    def checked(self, payload: bytes | str) -> bytes:
        """:meth:`command`, with an ``Exx`` or empty (unsupported) reply raised as SourceError."""
        reply = self.command(payload)
        if reply == b"" or re.fullmatch(rb"E[0-9a-fA-F]{2}", reply):
            what = payload if isinstance(payload, str) else payload.decode("ascii", "replace")
            raise SourceError(f"gdb://{self.address}: the stub answered {what.split(':')[0]!r} with {reply.decode() or 'nothing (unsupported)'}")
        return reply

    def require_qemu(self) -> set[str]:
        """The features of ``qqemu.Supported``; SourceError when the stub is not QEMU's."""
        reply = self.command(b"qqemu.Supported")
        if not reply or reply.startswith(b"E"):
            raise SourceError(
                f"gdb://{self.address}: not a QEMU gdbstub (no reply to qqemu.Supported); windump needs QEMU's physical-memory mode"
            )
        return set(reply.decode("ascii", "replace").split(";"))

    def phy_mem_mode(self) -> int:
        """QEMU's ``PhyMemMode``: 1 when ``m`` reads guest physical memory, 0 for virtual."""
        query = "qqemu.PhyMemMode"
        reply = self.checked(query)
        if not reply.isdigit():
            raise SourceError(f"gdb://{self.address}: the stub answered {query!r} with {reply.decode('ascii', 'replace')[:20]}")
        return int(reply)

    def set_phy_mem_mode(self, mode: int) -> None:
        if self.checked(f"Qqemu.PhyMemMode:{mode}") != b"OK":
            raise SourceError(f"gdb://{self.address}: the stub refused PhyMemMode {mode}")

    @contextlib.contextmanager
    def physical_memory(self, mode: int = 1) -> Iterator[None]:
        """Switch ``PhyMemMode`` to ``mode`` and restore the previous value on leaving, however we leave.

        The mode is global in QEMU and outlives our connection, so leaving it changed would turn the
        next debugger's virtual reads into physical ones. When leaving on an error, a failure to
        restore (the connection is gone) does not hide that error.
        """
        previous = self.phy_mem_mode()
        if previous != mode:
            self.set_phy_mem_mode(mode)
        try:
            yield
        except BaseException:
            if previous != mode:
                with contextlib.suppress(SourceError):
                    self.set_phy_mem_mode(previous)
            raise
        if previous != mode:
            self.set_phy_mem_mode(previous)


def _exchange(method):
    """Mark the connection out of step when anything but a SourceError (Ctrl-C above all) leaves
    ``method`` midway: its counts of replies in flight and acks owed may then be wrong, and
    :meth:`RemoteStub._drain` resynchronizes before the next request."""

    @functools.wraps(method)
    def exchange(self: RemoteStub, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except SourceError:
            raise
        except BaseException:
            self._out_of_step = True
            # The interrupted frame, alive in the traceback, may hold numpy views of the receive
            # buffer, which cannot be resized while viewed: resynchronize on a copy.
            self._received = bytearray(self._received)
            raise

    return exchange


class RemoteStub(QemuQueries):
    """A connection to a gdbstub; every failure is a one-line SourceError naming ``host:port``.

    QEMU's stub (7.2) has no ``QStartNoAckMode``: it acks each request with ``+`` and ignores our
    acks, so acks for replies ride along with the next requests. Connecting stops the VM.

    With ``connection`` (an already connected socket, e.g. a duplicate of gdb's own) no connection
    is made, and with ``features`` (that connection's ``qSupported`` reply, parsed) nothing is
    negotiated: the stub is only talked to, as its owner left it.
    """

    def __init__(self, host: str, port: int, timeout: float = 10.0, *, connection: socket.socket | None = None,
                 features: dict[str, str] | None = None) -> None:
        self.address = f"{host}:{port}"
        self.timeout = timeout
        if connection is not None:
            connection.settimeout(timeout)
            self._socket = connection
        else:
            try:
                self._socket = _connect(host, port, timeout)
            except OSError as error:
                raise SourceError(f"gdb://{self.address}: cannot connect: {error.strerror or error}") from None
        self._received = bytearray()
        self._pending = 0  # replies to requests we sent and have not read yet
        self._acks = 0  # replies read and not yet acked
        #: Whether an exchange was interrupted midway, so the two counts above cannot be trusted.
        self._out_of_step = False
        #: Why the connection is unusable (lost, silent, garbled): later requests fail with it at once.
        self._broken: str | None = None
        self.no_ack = False
        #: Whether the VM was running when we attached: QEMU then sends an unasked stop reply
        #: before any other, so it is known once the first request has been answered.
        self.stopped_running_vm = False
        self.features: dict[str, str] = {}
        self.packet_size = DEFAULT_PACKET_SIZE
        self._registers: list[Register] | None = None
        self._negotiated = False
        if features is not None:
            self._use_features(features)
            # The connection's owner switched acks off if the stub offered it (gdb does by default).
            self.no_ack = features.get("QStartNoAckMode") == "+"
            self._negotiated = True
            return
        try:
            self._negotiate()
        except BaseException:
            self._socket.close()
            raise

    def _use_features(self, features: dict[str, str]) -> None:
        self.features = features
        if "PacketSize" in features:
            size = features["PacketSize"]
            if not re.fullmatch(r"[0-9a-fA-F]{1,8}", size) or int(size, 16) < MIN_PACKET_SIZE:
                raise SourceError(f"gdb://{self.address}: bad PacketSize {size[:20]!r} in qSupported")
            self.packet_size = min(int(size, 16), MAX_PACKET_SIZE)

    def _negotiate(self) -> None:
        """``qSupported``: learn PacketSize, and switch acks off when the stub offers it."""
        reply = self.command(b"qSupported:multiprocess+;xmlRegisters=i386")
        self._negotiated = True
        self._use_features(parse_supported(reply))
        if self.features.get("QStartNoAckMode") == "+" and self.command(b"QStartNoAckMode") == b"OK":
            self._send(b"")  # the OK itself is still acked
            self.no_ack = True

    # --- wire -----------------------------------------------------------------------------------

    def _break(self, message: str) -> SourceError:
        """The error for a connection that cannot be used again, kept so later requests fail at once
        (and closing does not wait a timeout again) instead of reading garbage."""
        self._broken = message
        return SourceError(message)

    def _send(self, data: bytes) -> None:
        if self._acks and not self.no_ack:
            data = b"+" * self._acks + data
        self._acks = 0
        try:
            self._socket.sendall(data)
        except socket.timeout:
            raise self._break(f"gdb://{self.address}: the stub stopped accepting data for {self.timeout:g} s") from None
        except OSError as error:
            raise self._break(f"gdb://{self.address}: connection lost: {error.strerror or error}") from None

    @property
    def max_reply(self) -> int:
        """Bytes a reply may take before it is given up on: twice a window of ``m`` replies and slack."""
        return 2 * self.packet_size * READ_WINDOW + REPLY_SLACK

    def _receive_more(self) -> None:
        """Append what the stub sent next; called only while no complete reply is buffered, so the
        buffer holds one unfinished reply, whose size is bounded here."""
        if len(self._received) > self.max_reply:
            raise self._break(f"gdb://{self.address}: a reply ran past {self.max_reply} bytes without ending: "
                              "not QEMU's gdbstub, or a broken one")
        try:
            chunk = self._socket.recv(1 << 20)
            # QEMU's socket keeps Nagle on: it holds each small reply until our ACK comes, and a
            # delayed ACK costs up to 40 ms. Quick-ack mode resets itself, so ask again each time.
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except socket.timeout:
            hint = "" if self._negotiated else " (is another debugger attached? QEMU serves one client at a time)"
            raise self._break(f"gdb://{self.address}: no reply from the stub within {self.timeout:g} s{hint}") from None
        except OSError as error:
            raise self._break(f"gdb://{self.address}: connection lost: {error.strerror or error}") from None
        if not chunk:
            raise self._break(f"gdb://{self.address}: the stub closed the connection")
        self._received += chunk

    def _packet_bounds(self, position: int) -> tuple[int, int] | None:
        """Indexes of the ``$`` and ``#`` of the next complete packet at or after ``position``, or None.

        Only acks may precede it; a ``-`` (the stub asking for a retransmit) is an error, because
        our packets are framed correctly and a retransmit would reorder pipelined requests.
        """
        buffer = self._received
        start = buffer.find(b"$", position)
        if start < 0:
            junk = buffer[position:]
        else:
            junk = buffer[position:start]
        if junk.strip(b"+"):
            if b"-" in junk:
                raise self._break(f"gdb://{self.address}: the stub rejected a packet checksum")
            raise self._break(f"gdb://{self.address}: unexpected bytes between packets: {bytes(junk[:16])!r}")
        if start < 0:
            return None
        end = buffer.find(b"#", start)
        if end < 0 or end + 3 > len(buffer):
            return None
        return start, end

    def _check(self, start: int, end: int) -> None:
        buffer = self._received
        try:
            expected = int(buffer[end + 1 : end + 3], 16)
        except ValueError:
            raise self._break(f"gdb://{self.address}: malformed packet checksum {bytes(buffer[end + 1 : end + 3])!r}") from None
        if checksum(buffer[start + 1 : end]) != expected:
            raise self._break(f"gdb://{self.address}: reply with a bad checksum")

    def _next_reply(self, stop_reply: bool = False) -> bytes:
        """The next reply's decoded payload, skipping stop notifications unless ``stop_reply``."""
        while True:
            while (bounds := self._packet_bounds(0)) is None:
                self._receive_more()
            start, end = bounds
            self._check(start, end)
            body = self._received[start + 1 : end]
            del self._received[: end + 3]
            self._acks += 1
            if stop_reply or not _STOP_REPLY.match(body):
                self._pending -= 1
                return decode(body, f"gdb://{self.address}")
            self.stopped_running_vm = True

    def _drain(self) -> None:
        """Make the connection ready for a request: replies to requests an interrupted pipeline
        left in flight read and dropped, after an interrupted exchange whatever the stub sends."""
        if self._broken is not None:
            raise SourceError(self._broken)
        if self._out_of_step:
            self._resynchronize()
        while self._pending > 0:
            self._next_reply()

    def _resynchronize(self) -> None:
        """After an interrupted exchange: drop whatever the stub sends until it falls quiet.

        The stub has answered every request it received by then; the counts of replies in flight
        cannot be trusted, so none is used. A stub that keeps talking, or one that asks for a
        retransmit (our request was cut midway), leaves the connection broken. ``select`` waits,
        as the socket's own timeout cannot change: it may be a duplicate of gdb's.
        """
        deadline = time.monotonic() + RESYNC_SECONDS
        while select.select([self._socket], [], [], QUIET_SECONDS)[0]:
            if time.monotonic() > deadline:
                raise self._break(f"gdb://{self.address}: the stub did not fall quiet within {RESYNC_SECONDS:g} s "
                                  "after an interruption")
            self._receive_more()
            self._drop_replies()
        self._drop_replies()
        if self._received.strip(b"+"):
            raise self._break(f"gdb://{self.address}: the stub left a reply unfinished after an interruption")
        self._received.clear()
        self._pending = 0
        self._out_of_step = False

    def _drop_replies(self) -> None:
        """Drop every complete packet in the receive buffer (remembering stop replies), owing an ack for each."""
        position = 0
        while bounds := self._packet_bounds(position):
            if _STOP_REPLY.match(self._received, bounds[0] + 1):
                self.stopped_running_vm = True
            position = bounds[1] + 3
            self._acks += 1
        del self._received[:position]

    @_exchange
    def settle(self) -> None:
        """Leave the connection quiet: replies in flight read and dropped, every reply acked.

        For a connection shared with another client (gdb's), which must find no stray bytes.
        """
        self._drain()
        if self._acks and not self.no_ack:
            self._send(b"")

    @_exchange
    def command(self, payload: bytes | str) -> bytes:
        """Send one packet and return its reply (console ``O`` packets are not expected here)."""
        if isinstance(payload, str):
            payload = payload.encode()
        self._drain()
        self._pending += 1
        self._send(frame(payload))
        return self._next_reply()

    # --- queries --------------------------------------------------------------------------------

    @_exchange
    def stop_reason(self) -> bytes:
        """The ``?`` reply, e.g. ``T05thread:01;``."""
        self._drain()
        self._pending += 1
        self._send(frame(b"?"))
        return self._next_reply(stop_reply=True)

    def threads(self) -> list[str]:
        """Thread ids from ``qfThreadInfo``/``qsThreadInfo``; QEMU has one per vCPU, in CPU order."""
        ids: list[str] = []
        reply = self.command(b"qfThreadInfo")
        while reply.startswith(b"m") and _THREAD_IDS.fullmatch(reply, 1):
            ids += reply[1:].decode().split(",")
            reply = self.command(b"qsThreadInfo")
        if reply != b"l":
            raise SourceError(f"gdb://{self.address}: bad thread list reply {reply[:20]!r}")
        return ids

    def read_xfer(self, obj: str, annex: str) -> bytes:
        """The whole ``qXfer:OBJ:read:ANNEX`` object, fetched in PacketSize pieces."""
        data = bytearray()
        piece = max(self.packet_size - 16, 64)
        while True:
            reply = self.checked(f"qXfer:{obj}:read:{annex}:{len(data):x},{piece:x}")
            data += reply[1:]
            if reply[:1] == b"l":
                return bytes(data)
            if reply[:1] != b"m":
                raise SourceError(f"gdb://{self.address}: bad qXfer reply {reply[:20]!r}")

    def registers(self) -> list[Register]:
        """The stub's registers, from ``qXfer:features:read:target.xml`` and its includes."""
        if self._registers is None:
            if self.features.get("qXfer:features:read") != "+":
                raise SourceError(f"gdb://{self.address}: the stub offers no target description (qXfer:features:read)")
            documents = {}
            todo = ["target.xml"]
            while todo:
                name = todo.pop()
                if name not in documents:
                    documents[name] = self.read_xfer("features", name)
                    todo += xml_includes(documents[name])
            self._registers = parse_target_description(documents)
        return self._registers

    def select_thread(self, thread: str) -> None:
        """``Hg``: make ``thread`` the one ``g`` and ``p`` read."""
        if self.command(f"Hg{thread}") != b"OK":
            raise SourceError(f"gdb://{self.address}: the stub has no thread {thread}")

    def read_registers(self, thread: str | None = None) -> dict[str, int]:
        """The registers of ``thread`` (the current one when None) as unsigned integers, from ``g``.

        Registers the stub marks unavailable (``xx``) or leaves out of a short reply are omitted.
        """
        if thread is not None:
            self.select_thread(thread)
        digits = self.checked(b"g")
        values = {}
        for register in self.registers():
            field = digits[2 * register.offset : 2 * (register.offset + register.size)]
            if len(field) == 2 * register.size and b"x" not in field:
                try:
                    values[register.name] = int.from_bytes(binascii.a2b_hex(field), "little")
                except binascii.Error:
                    raise SourceError(f"gdb://{self.address}: the 'g' reply for thread {thread or '(selected)'} "
                                      f"gives {register.name} as {bytes(field[:20])!r}, not hex digits") from None
        return values

    def vcpu_registers(self) -> list[dict[str, int]]:
        """Every vCPU's registers (gdb's names), in CPU order: QEMU has one thread per vCPU."""
        threads = self.threads()
        states = [self.read_registers(thread) for thread in threads]
        self.select_thread(threads[0])
        return states

    @_exchange
    def monitor(self, command: str) -> str:
        """Run a monitor (QEMU HMP) command with ``qRcmd``; its output (``O<hex>`` packets, CRLF
        line ends) is returned with plain newlines."""
        self._drain()
        self._pending += 1
        self._send(frame(b"qRcmd," + command.encode().hex().encode()))
        output = []
        while True:
            reply = self._next_reply()
            if reply.startswith(b"O") and reply != b"OK":
                self._pending += 1  # the command's final reply is still to come
                try:
                    output.append(binascii.a2b_hex(reply[1:]))
                    continue
                except binascii.Error:
                    self._out_of_step = True  # how many more packets the stub sends is anyone's guess
            elif reply == b"OK":
                return b"".join(output).decode("utf-8", "replace").replace("\r\n", "\n")
            elif reply == b"":
                raise SourceError(f"gdb://{self.address}: the stub runs no monitor commands (qRcmd)")
            raise SourceError(f"gdb://{self.address}: monitor command {command!r} failed: {reply.decode('ascii', 'replace')[:40]}")

    def detach(self) -> None:
        """``D`` for every process: the stub resumes the VM once none is attached.

        We announce ``multiprocess+`` (QEMU 7.2 keeps it on for later connections once any client
        did), so thread ids read ``pPID.TID`` and each process is detached as ``D;PID``.
        """
        pids = dict.fromkeys(thread[1:].split(".")[0] for thread in self.threads() if thread.startswith("p"))
        for pid in pids or [None]:
            self.checked(b"D" if pid is None else f"D;{pid}".encode())

    # --- memory --------------------------------------------------------------------------------

    @property
    def max_read(self) -> int:
        """Bytes per ``m``: the largest power of two whose hex reply fits in PacketSize."""
        return 1 << ((self.packet_size // 2).bit_length() - 1)

    def read_memory(self, address: int, length: int) -> bytes:
        """``length`` bytes from ``address`` (physical in PhyMemMode 1, else through the current vCPU)."""
        buffer = bytearray(length)
        self.readinto(address, buffer)
        return bytes(buffer)

    @_exchange
    def readinto(self, address: int, buffer: memoryview | bytearray) -> None:
        """Fill ``buffer`` from ``address`` keeping :data:`READ_WINDOW` ``m`` requests in flight.

        Replies are parsed a receive-buffer at a time: checksums summed with numpy, hex decoded by
        ``binascii``. An interrupted read leaves replies in flight; the next command drains them.
        """
        view = memoryview(buffer).cast("B")
        size = self.max_read
        offsets = range(0, len(view), size)
        self._drain()
        sent = done = 0
        while done < len(offsets):
            if sent - done <= READ_WINDOW // 2 and sent < len(offsets):
                batch = offsets[sent : done + READ_WINDOW]
                requests = b"".join(read_request(address + o, min(size, len(view) - o)) for o in batch)
                self._pending += len(batch)  # before sending: an interrupted send leaves the count high, not low
                self._send(requests)
                sent += len(batch)
            parsed = self._parse_memory_replies(view, offsets, done, sent, address)
            if not parsed:
                self._receive_more()
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
        size = offsets.step
        full = min(sent, len(view) // size) - done  # replies in flight that carry a whole ``size``
        prefix = 0 if self.no_ack else 1  # QEMU acks each request just before answering it
        stride = prefix + 1 + 2 * size + 3
        count = min(full, len(self._received) // stride)
        if count <= 0:
            return 0
        frames = np.frombuffer(self._received, dtype=np.uint8, count=count * stride).reshape(count, stride)
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
                data = binascii.a2b_hex(np.ascontiguousarray(digits)) if regular else b""
            except binascii.Error:  # not hex: the one-by-one parser names the address
                regular = False
        del frames, digits  # the bytearray cannot shrink while numpy views it
        if not regular:
            return 0
        view[offsets[done] : offsets[done] + count * size] = data
        del self._received[: count * stride]
        self._pending -= count
        self._acks += count
        return count

    def _parse_replies_one_by_one(self, view: memoryview, offsets: range, done: int, sent: int, address: int) -> int:
        """Decode each complete ``m`` reply in the receive buffer, whatever its form."""
        spans = []
        position = 0
        while done + len(spans) < sent and (bounds := self._packet_bounds(position)):
            if self._received[bounds[0] + 1] in b"TS":  # a stop notification: hex never starts so
                self.stopped_running_vm = True
                self._acks += 1
            else:
                spans.append(bounds)
            position = bounds[1] + 3
        if not spans:
            del self._received[:position]
            return 0
        starts, ends = np.array(spans, dtype=np.int64).T
        raw = np.frombuffer(self._received, dtype=np.uint8)
        cuts = np.stack([starts + 1, ends], axis=1).ravel()
        sums = np.add.reduceat(raw, cuts, dtype=np.uint8)[::2]  # wraps: exactly the sum mod 256
        sums = np.where(ends > starts + 1, sums, 0)
        stated = HEX_VALUE[raw[ends + 1]] * 16 + HEX_VALUE[raw[ends + 2]]  # above 0xff: not hex
        del raw  # the bytearray cannot shrink while numpy views it
        try:
            for (start, end), total, expected, index in zip(spans, sums.tolist(), stated.tolist(), range(done, done + len(spans))):
                if expected > 0xFF:
                    raise self._break(f"gdb://{self.address}: malformed packet checksum {bytes(self._received[end + 1 : end + 3])!r}")
                if expected != total:
                    raise self._break(f"gdb://{self.address}: reply with a bad checksum")
                self._read_reply(self._received[start + 1 : end], view, offsets[index], address)
        finally:  # every complete reply is consumed, failing or not, so the connection stays in step
            del self._received[:position]
            self._pending -= len(spans)
            self._acks += len(spans)
        return len(spans)

    def _read_reply(self, body: bytes, view: memoryview, offset: int, address: int) -> None:
        """Decode one ``m`` reply's body into ``view`` at ``offset``; SourceError names what it was for."""
        length = min(self.max_read, len(view) - offset)
        try:
            if len(body) != 2 * length or b"*" in body or b"}" in body:
                body = decode(body, f"gdb://{self.address}")
            view[offset : offset + length] = binascii.a2b_hex(body)
        except (ValueError, SourceError):  # binascii.Error is a ValueError; also a wrong length
            reply = body.decode("ascii", "replace")[:20]
            raise SourceError(
                f"gdb://{self.address}: cannot read {length:#x} bytes at {address + offset:#x}: the stub answered {reply!r}"
            ) from None

    @property
    def connection(self) -> socket.socket:
        """The TCP socket, e.g. to find which local process is at its other end."""
        return self._socket

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> RemoteStub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
