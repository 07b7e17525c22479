"""A client for the GDB remote serial protocol (RSP) as QEMU's gdbstub speaks it, without a gdb binary.

It connects, asks the stub what it supports, names registers from the stub's target description
(:mod:`targetxml`), runs monitor (HMP) commands with ``qRcmd``, and reads memory with many ``m``
requests in flight (:mod:`rspmemory`); the bytes on the wire are :mod:`rspwire`'s.
"""

from __future__ import annotations

import binascii
import re
import socket
from typing import Self

from ..errors import SourceError
from .rspmemory import PipelinedReads
from .rspwire import RspWire
from .targetxml import Register, parse_target_description, xml_includes

#: The thread ids of a ``qfThreadInfo`` reply after its ``m``: ``1,2`` or, multiprocess, ``p1.1,p1.2``.
_THREAD_IDS = re.compile(rb"[0-9a-fA-Fp.,-]+")

#: Socket receive buffer asked for (the kernel caps it at net.core.rmem_max).
RECEIVE_BUFFER = 4 << 20

#: The smallest PacketSize we accept: below it not even our own queries fit.
MIN_PACKET_SIZE = 0x40

#: PacketSize larger offers are cut to (QEMU offers 0x1000; gdb itself caps at 0x4000).
MAX_PACKET_SIZE = 0x10000


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

    Shared by :class:`RemoteStub` (our socket) and :class:`~.gdbconnection.GdbConnection` (gdb's
    own connection), so both switch ``PhyMemMode`` the same way (:class:`~.phymemmode.PhyMemMode`).
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
            raise SourceError(f"gdb://{self.address}: the stub answered {what.split(':')[0]!r} "
                              f"with {reply.decode() or 'nothing (unsupported)'}")
        return reply

    def require_qemu(self) -> set[str]:
        """The features of ``qqemu.Supported``; SourceError when the stub is not QEMU's."""
        reply = self.command(b"qqemu.Supported")
        if not reply or reply.startswith(b"E"):
            raise SourceError(
                f"gdb://{self.address}: not a QEMU gdbstub (no reply to qqemu.Supported); "
                f"windump needs QEMU's physical-memory mode"
            )
        return set(reply.decode("ascii", "replace").split(";"))

    def phy_mem_mode(self) -> int:
        """QEMU's ``PhyMemMode``: 1 when ``m`` reads guest physical memory, 0 for virtual."""
        query = "qqemu.PhyMemMode"
        reply = self.checked(query)
        if not reply.isdigit():
            raise SourceError(f"gdb://{self.address}: the stub answered {query!r} "
                              f"with {reply.decode('ascii', 'replace')[:20]}")
        return int(reply)

    def set_phy_mem_mode(self, mode: int) -> None:
        if self.checked(f"Qqemu.PhyMemMode:{mode}") != b"OK":
            raise SourceError(f"gdb://{self.address}: the stub refused PhyMemMode {mode}")


class RemoteStub(QemuQueries):
    """A connection to a gdbstub; every failure is a one-line SourceError naming ``host:port``.

    Connecting stops the VM. With ``connection`` (an already connected socket, e.g. a duplicate of
    gdb's own) no connection is made, and with ``features`` (that connection's ``qSupported``
    reply, parsed) nothing is negotiated: the stub is only talked to, as its owner left it.
    """

    def __init__(self, host: str, port: int, timeout: float = 10.0, *, connection: socket.socket | None = None,
                 features: dict[str, str] | None = None) -> None:
        self.address = f"{host}:{port}"
        self.timeout = timeout
        if connection is not None:
            connection.settimeout(timeout)
        else:
            try:
                connection = _connect(host, port, timeout)
            except OSError as error:
                raise SourceError(f"gdb://{self.address}: cannot connect: {error.strerror or error}") from None
        self.wire = RspWire(connection, self.address, timeout)
        self._memory = PipelinedReads(self.wire)
        self.features: dict[str, str] = {}
        self._registers: list[Register] | None = None
        if features is not None:
            self._use_features(features)
            # The connection's owner switched acks off if the stub offered it (gdb does by default).
            self.wire.no_ack = features.get("QStartNoAckMode") == "+"
            self.wire.negotiated = True
            return
        try:
            self._negotiate()
        except BaseException:
            self.wire.close()
            raise

    def _use_features(self, features: dict[str, str]) -> None:
        self.features = features
        if "PacketSize" in features:
            size = features["PacketSize"]
            if not re.fullmatch(r"[0-9a-fA-F]{1,8}", size) or int(size, 16) < MIN_PACKET_SIZE:
                raise SourceError(f"gdb://{self.address}: bad PacketSize {size[:20]!r} in qSupported")
            self.wire.packet_size = min(int(size, 16), MAX_PACKET_SIZE)

    def _negotiate(self) -> None:
        """``qSupported``: learn PacketSize, and switch acks off when the stub offers it."""
        self._use_features(parse_supported(self.command(b"qSupported:multiprocess+;xmlRegisters=i386")))
        if self.features.get("QStartNoAckMode") == "+" and self.command(b"QStartNoAckMode") == b"OK":
            self.wire.send(b"")  # the OK itself is still acked
            self.wire.no_ack = True

    @property
    def stopped_running_vm(self) -> bool:
        """Whether attaching stopped a running VM (QEMU's unasked stop reply came)."""
        return self.wire.stopped_running_vm

    @property
    def no_ack(self) -> bool:
        return self.wire.no_ack

    @property
    def packet_size(self) -> int:
        return self.wire.packet_size

    def command(self, payload: bytes | str) -> bytes:
        """Send one packet and return its reply (console ``O`` packets are not expected here)."""
        with self.wire.exchange():
            return self.wire.request(payload.encode() if isinstance(payload, str) else payload)

    def settle(self) -> None:
        """Leave the connection quiet (see :meth:`RspWire.settle`), for one shared with gdb."""
        self.wire.settle()

    # --- queries --------------------------------------------------------------------------------

    def stop_reason(self) -> bytes:
        """The ``?`` reply, e.g. ``T05thread:01;``."""
        with self.wire.exchange():
            return self.wire.request(b"?", stop_reply=True)

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

    def monitor(self, command: str) -> str:
        """Run a monitor (QEMU HMP) command with ``qRcmd``; its output (``O<hex>`` packets, CRLF
        line ends) is returned with plain newlines."""
        wire = self.wire
        with wire.exchange():
            reply = wire.request(b"qRcmd," + command.encode().hex().encode())
            output = []
            while True:
                if reply.startswith(b"O") and reply != b"OK":
                    try:
                        output.append(binascii.a2b_hex(reply[1:]))
                    except binascii.Error:
                        wire.lose_step()  # how many more packets the stub sends is anyone's guess
                    else:
                        wire.pending += 1  # the command's final reply is still to come
                        reply = wire.next_reply()
                        continue
                elif reply == b"OK":
                    return b"".join(output).decode("utf-8", "replace").replace("\r\n", "\n")
                elif reply == b"":
                    raise SourceError(f"gdb://{self.address}: the stub runs no monitor commands (qRcmd)")
                raise SourceError(f"gdb://{self.address}: monitor command {command!r} failed: "
                                  f"{reply.decode('ascii', 'replace')[:40]}")

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
        """Bytes per ``m`` request."""
        return self._memory.max_read

    def read_memory(self, address: int, length: int) -> bytes:
        """``length`` bytes from ``address`` (physical in PhyMemMode 1, else through the current vCPU)."""
        buffer = bytearray(length)
        self.readinto(address, buffer)
        return bytes(buffer)

    def readinto(self, address: int, buffer: memoryview | bytearray) -> None:
        """Fill ``buffer`` from ``address`` with pipelined ``m`` requests (:class:`PipelinedReads`)."""
        self._memory.readinto(address, buffer)

    @property
    def connection(self) -> socket.socket:
        """The TCP socket, e.g. to find which local process is at its other end."""
        return self.wire.socket

    def close(self) -> None:
        self.wire.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
