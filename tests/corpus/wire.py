"""Hostile gdbstub replies and QMP conversations, and the one SourceError line each must give.

A scripted peer on loopback answers the opening handshake as QEMU does, then sends the hostile
bytes in answer to the request under test and hangs up. ``{address}`` in a message stands for the
peer's ``127.0.0.1:PORT``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from windump_plugins.live.rsp import RemoteStub
from windump_plugins.live.rsppacket import frame

PACKET = re.compile(rb"\$[^#]*#..", re.S)

#: qSupported as QEMU 7.2 answers it, with a small PacketSize so reads take several packets.
SUPPORTED = frame(b"PacketSize=100;qXfer:features:read+;qXfer:threads:read+")


def raw(payload: bytes) -> bytes:
    """``$payload#cs`` exactly as given: no escaping, the checksum of the bytes as they are."""
    return b"$%s#%02x" % (payload, sum(payload) & 0xFF)


@dataclass(frozen=True)
class BadReply:
    """The stub acks the request ``operation`` sends with ``+`` and answers it with ``reply``, then
    hangs up; ``operation`` must raise SourceError ``message``."""

    name: str
    operation: Callable[[RemoteStub], object]
    reply: bytes
    message: str
    supported: bytes = SUPPORTED


def command(stub: RemoteStub) -> object:
    return stub.command(b"qC")


def read4(stub: RemoteStub) -> object:
    return stub.read_memory(0, 4)


def read_pages(stub: RemoteStub) -> object:
    return stub.read_memory(0, 0x1000)



BAD_REPLIES = [
    BadReply("bad checksum", command, b"+$OK#00", "gdb://{address}: reply with a bad checksum"),
    BadReply("checksum not hex", command, b"+$OK#zz", "gdb://{address}: malformed packet checksum b'zz'"),
    BadReply("retransmit request", command, b"-", "gdb://{address}: the stub rejected a packet checksum"),
    BadReply("junk before the reply", command, b"garbage" + raw(b"OK"),
             "gdb://{address}: unexpected bytes between packets: b'garbage'"),
    BadReply("hangs up inside a reply", command, b"+$O", "gdb://{address}: the stub closed the connection"),
    BadReply("hangs up without a reply", command, b"+", "gdb://{address}: the stub closed the connection"),
    BadReply("run length first", command, raw(b'*"'),
             "gdbstub reply starts with a run-length marker: not a valid packet"),
    BadReply("escape at the end", command, raw(b"}"), "gdb://{address}: reply ends inside an escape or run length"),
    BadReply("run length at the end", command, raw(b"a*"),
             "gdb://{address}: reply ends inside an escape or run length"),
    BadReply("memory error reply", read4, b"+" + raw(b"E14"),
             "gdb://{address}: cannot read 0x4 bytes at 0x0: the stub answered 'E14'"),
    BadReply("memory reply too short", read4, b"+" + raw(b"0000"),
             "gdb://{address}: cannot read 0x4 bytes at 0x0: the stub answered '0000'"),
    BadReply("memory reply too long", read4, b"+" + raw(b"0000000000"),
             "gdb://{address}: cannot read 0x4 bytes at 0x0: the stub answered '0000000000'"),
    BadReply("memory reply with a bad checksum", read4, b"+$00000000#01",
             "gdb://{address}: reply with a bad checksum"),
    BadReply("memory replies cut midway", read_pages, b"+" + raw(b"00" * 0x80) * 3 + b"+$00",
             "gdb://{address}: the stub closed the connection"),
    BadReply("memory reply not hex", read4, b"+" + raw(b"zzzzzzzz"),
             "gdb://{address}: cannot read 0x4 bytes at 0x0: the stub answered 'zzzzzzzz'"),
    BadReply("memory checksum not hex", read4, b"+$00000000#zz",
             "gdb://{address}: malformed packet checksum b'zz'"),
    BadReply("thread list garbage", lambda stub: stub.threads(), b"+" + raw(b"x"),
             "gdb://{address}: bad thread list reply b'x'"),
    BadReply("thread list not text", lambda stub: stub.threads(), b"+" + raw(b"m\xff\xfe"),
             "gdb://{address}: bad thread list reply b'm\\xff\\xfe'"),
    BadReply("monitor output not hex", lambda stub: stub.monitor("info mtree -f"), b"+" + raw(b"O123"),
             "gdb://{address}: monitor command 'info mtree -f' failed: O123"),
    BadReply("monitor refused", lambda stub: stub.monitor("info mtree -f"), b"+" + raw(b"E01"),
             "gdb://{address}: monitor command 'info mtree -f' failed: E01"),
    BadReply("PhyMemMode not a number", lambda stub: stub.phy_mem_mode(), b"+" + raw(b"yes"),
             "gdb://{address}: the stub answered 'qqemu.PhyMemMode' with yes"),
    BadReply("PhyMemMode unsupported", lambda stub: stub.phy_mem_mode(), b"+" + raw(b""),
             "gdb://{address}: the stub answered 'qqemu.PhyMemMode' with nothing (unsupported)"),
    BadReply("PacketSize not hex", command, b"+" + raw(b"OK"), "gdb://{address}: bad PacketSize 'zz' in qSupported",
             supported=raw(b"PacketSize=zz")),
    BadReply("PacketSize 0", read4, b"+" + raw(b"00000000"), "gdb://{address}: bad PacketSize '0' in qSupported",
             supported=raw(b"PacketSize=0")),
]


class ScriptedStub:
    """One connection on 127.0.0.1: answers qSupported with ``supported``, then sends ``reply`` to
    the next request and shuts its sending side, still reading so the client's writes succeed."""

    def __init__(self, supported: bytes, reply: bytes) -> None:
        self.supported = supported
        self.reply = reply
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        connection, _ = self._server.accept()
        with connection, contextlib.suppress(OSError):
            received = b""
            answered = 0
            while chunk := connection.recv(65536):
                received += chunk
                while match := PACKET.search(received):
                    received = received[match.end():]
                    if answered == 0:
                        connection.sendall(b"+" + self.supported)
                    elif answered == 1:
                        connection.sendall(self.reply)
                        connection.shutdown(socket.SHUT_WR)
                    answered += 1

    def close(self) -> None:
        self._server.close()
        self._thread.join(5)


@dataclass(frozen=True)
class BadQmp:
    """A QMP peer that greets with ``greeting`` (None: stays silent) and answers each command
    from ``replies`` (a reply of None hangs up); opening the ``qmp:`` source must raise
    SourceError ``message`` (``{path}``: the socket)."""

    name: str
    replies: dict[str, object]
    message: str
    greeting: bytes | None = b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}\r\n'
    prefix: bool = False
    #: Commands the source must have sent, in this order, before failing.
    sent: tuple[str, ...] = ()


#: ``query-dump`` of a QEMU writing no dump.
IDLE_DUMP = {"status": "none", "completed": 0, "total": 0}

MTREE = 'FlatView #0\n AS "memory", root: system\n Root memory region: system\n  0000000000000000-0000000007ffffff (prio 0, ram): pc.ram\n'

BAD_QMP = [
    BadQmp("silent peer", {},
           "qmp:{path}: {path} sent no QMP greeting within 1 s: another client may hold the monitor "
           "(QEMU serves one client per QMP monitor), or it is not a QEMU QMP monitor", greeting=None),
    BadQmp("SSH server", {},
           "qmp:{path}: {path} is not a QEMU QMP monitor (it greets with b'SSH-2.0-OpenSSH_9.2\\r\\n')",
           greeting=b"SSH-2.0-OpenSSH_9.2\r\n"),
    BadQmp("hangs up at negotiation", {"qmp_capabilities": None},
           "qmp:{path}: lost the QMP connection during qmp_capabilities (did QEMU quit?):", prefix=True),
    BadQmp("query-dump refused", {"query-dump": {"error": {"class": "GenericError", "desc": "no"}}},
           "qmp:{path}: QMP query-dump failed: no"),
    BadQmp("query-dump without status", {"query-dump": {"return": {}}},
           "qmp:{path}: QMP query-dump answered {{}}, without 'status'"),
    BadQmp("query-status not an object", {"query-dump": {"return": IDLE_DUMP}, "query-status": {"return": []}},
           "qmp:{path}: QMP query-status answered [], without 'running'"),
    BadQmp("stop refused", {"query-dump": {"return": IDLE_DUMP},
                            "query-status": {"return": {"running": True}},
                            "stop": {"error": {"class": "GenericError", "desc": "busy"}}},
           "qmp:{path}: QMP stop failed: busy"),
    BadQmp("hangs up after stop", {"query-dump": {"return": IDLE_DUMP},
                                   "query-status": {"return": {"running": True}}, "stop": {"return": {}},
                                   "human-monitor-command": None},
           "qmp:{path}: lost the QMP connection during human-monitor-command (did QEMU quit?):", prefix=True,
           sent=("query-dump", "query-status", "stop", "human-monitor-command")),
    BadQmp("mtree is not text", {"query-dump": {"return": IDLE_DUMP},
                                 "query-status": {"return": {"running": False}},
                                 "human-monitor-command": {"return": 7}},
           "qmp:{path}: QMP human-monitor-command answered 7, not text"),
    BadQmp("mtree without system memory", {"query-dump": {"return": IDLE_DUMP},
                                           "query-status": {"return": {"running": False}},
                                           "human-monitor-command": {"return": "FlatView #0\n AS \"I/O\"\n"}},
           '"info mtree -f" shows no flat view of address space "memory"'),
    BadQmp("no RAM at all", {"query-dump": {"return": IDLE_DUMP},
                             "query-status": {"return": {"running": False}},
                             "human-monitor-command": {"return": MTREE.replace("ram)", "i/o)")}},
           'qmp:{path}: the guest has no RAM in "info mtree -f"'),
    BadQmp("dump already running", {"query-dump": {"return": {"status": "active", "completed": 5, "total": 9}}},
           "qmp:{path}: QEMU is already writing a dump (5 of 9 bytes); wait for it to finish, then try again"),
]


class ScriptedQmp:
    """A QMP peer on a unix socket that plays one :class:`BadQmp`; ``commands`` lists what it was sent."""

    def __init__(self, path: str, case: BadQmp) -> None:
        self.case = case
        self.commands: list[str] = []
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(path)
        self._server.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            connection, _ = self._server.accept()
        with connection, contextlib.suppress(OSError):
            if self.case.greeting is None:
                connection.recv(1)  # until the client gives up and hangs up
                return
            connection.sendall(self.case.greeting)
            self._answer(connection)

    def _answer(self, connection: socket.socket) -> None:
        """Answer each JSON request (QMP clients need not end them with a newline)."""
        decoder = json.JSONDecoder()
        pending = ""
        while chunk := connection.recv(65536):
            pending += chunk.decode()
            while pending.strip():
                try:
                    request, end = decoder.raw_decode(pending.lstrip())
                except json.JSONDecodeError:
                    break
                pending = pending.lstrip()[end:]
                name = request.get("execute")
                self.commands.append(name)
                reply = self.case.replies.get(name, {"return": {}})
                if reply is None:
                    return
                reply = dict(reply)
                if "id" in request:
                    reply["id"] = request["id"]
                connection.sendall(json.dumps(reply).encode() + b"\r\n")

    def close(self) -> None:
        self._server.close()
        self._thread.join(5)


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
