"""The first words of a peer that should be a QMP monitor: QEMU's greeting read within a deadline,
or one line that says what the peer is instead (a gdbstub, a monitor another client holds).

QEMU greets each QMP client at once when it accepts the connection, so silence means either that
QEMU has not accepted it (it serves one client per monitor: the connection waits in the accept
queue while another client holds the monitor) or that the peer is no QMP monitor. A gdbstub speaks
first only when accepting us stopped a running VM: it then sends an unasked stop reply (``$T05...``).
Nothing is sent to a silent peer: a probe would wait in the queue and reach a QMP monitor later.
"""

from __future__ import annotations

import json
import select
import socket
import time

from ..errors import SourceError
from .procmem import peer_accepted

#: Bytes every QEMU greeting starts with.
GREETING_PREFIX = b'{"QMP"'

#: Longest greeting read (QEMU's is a few hundred bytes).
GREETING_LIMIT = 1 << 16

#: A gdbstub's detach packet: QEMU then resumes the VM that accepting the connection stopped.
RSP_DETACH = b"+$D#44"


def read_greeting(sock: socket.socket, *, timeout: float, description: str, where: str) -> dict:
    """QEMU's greeting, consumed from ``sock`` (and nothing after it) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    greeting = b""
    while not greeting.endswith(b"\n"):
        if not _readable(sock, deadline):
            raise SourceError(_silent(sock, greeting, timeout, description, where))
        peeked = sock.recv(GREETING_LIMIT, socket.MSG_PEEK)
        if not peeked:
            raise SourceError(f"{description}: {where} closed the connection "
                              f"{'after ' + repr(greeting) if greeting else 'without a word'}: not a QEMU QMP monitor")
        end = peeked.find(b"\n")
        greeting += sock.recv(len(peeked) if end < 0 else end + 1)  # consumed: the next wait blocks
        if greeting[:1] in (b"+", b"$"):
            _detach_gdbstub(sock, deadline)
            raise SourceError(f"{description}: {where} answers like a gdbstub (it sent {greeting[:24]!r}): "
                              f"this looks like a gdbstub; use gdb://{where}")
        if not GREETING_PREFIX.startswith(greeting[:len(GREETING_PREFIX)]) or len(greeting) > GREETING_LIMIT:
            raise SourceError(f"{description}: {where} is not a QEMU QMP monitor (it greets with {greeting[:40]!r})")
    try:
        message = json.loads(greeting)
    except ValueError:
        message = None
    if not isinstance(message, dict) or not isinstance(message.get("QMP"), dict):
        raise SourceError(f"{description}: {where} is not a QEMU QMP monitor (it greets with {greeting[:40]!r})")
    return message["QMP"]


def _readable(sock: socket.socket, deadline: float) -> bool:
    remaining = deadline - time.monotonic()
    return remaining > 0 and bool(select.select([sock], [], [], remaining)[0])


def _silent(sock: socket.socket, greeting: bytes, timeout: float, description: str, where: str) -> str:
    """Why no whole greeting came: a partial one, a monitor another client holds, or no monitor."""
    if greeting:
        return (f"{description}: {where} sent {greeting[:40]!r} and then nothing for {timeout:g} s: "
                f"not a QEMU QMP monitor, or QEMU hangs")
    if sock.family != socket.AF_UNIX and peer_accepted(sock) is False:
        return (f"{description}: QEMU has not accepted the connection to {where} within {timeout:g} s: "
                f"another client may hold the monitor (QEMU serves one client per QMP monitor)")
    if sock.family == socket.AF_UNIX:
        return (f"{description}: {where} sent no QMP greeting within {timeout:g} s: another client may hold "
                f"the monitor (QEMU serves one client per QMP monitor), or it is not a QEMU QMP monitor")
    return (f"{description}: {where} accepted the connection but sent nothing within {timeout:g} s: not a QEMU "
            f"QMP monitor (a gdbstub of a stopped VM is silent too; for one, use gdb://{where})")


def _detach_gdbstub(sock: socket.socket, deadline: float) -> None:
    """Detach from a gdbstub whose unasked stop reply says accepting us stopped a running VM, so
    QEMU runs it again; its answer is read (briefly) so the detach is handled before we close."""
    try:
        sock.sendall(RSP_DETACH)
        answer = b""
        while b"$OK#9a" not in answer and _readable(sock, min(deadline, time.monotonic() + 1.0)):
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    except OSError:
        pass
