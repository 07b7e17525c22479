"""A QMP connection to a QEMU on this host: commands and HMP through it, the guest paused and
resumed with the time it spent paused, and file descriptors passed to QEMU with ``getfd``."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import SourceError
from .procmem import peer_pid
from .qmpgreeting import read_greeting

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

log = logging.getLogger(__name__)


class QmpConnection:
    """QEMU's QMP monitor at ``address`` (a unix socket path, or ``(host, port)`` on this host).

    ``pid`` is QEMU's process (``SO_PEERCRED``, or the local end of the TCP connection). Every
    failure is one SourceError line starting with ``description``; once the connection is
    :attr:`lost`, nothing more is sent (cleanup must not replace the error that told of the loss).
    """

    def __init__(self, address: str | tuple[str, int], *, timeout: float, description: str) -> None:
        self.address = address
        self.timeout = timeout
        self.description = description
        self.lost = False
        #: Whether :meth:`pause` found the guest running (and so stopped it).
        self.was_running = False
        self._paused_at: float | None = None
        self._paused_for = 0.0
        self._names = itertools.count()
        self._socket = self._connect()
        self.pid = self._find_pid()
        # QEMU's client (and asyncio) is imported only here: loading the plugins, as every windump
        # and windump-save run does, then costs no 18 ms for a connection it may never make.
        from qemu.qmp import QMPError
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self._qmp: QEMUMonitorProtocol = QEMUMonitorProtocol(self._socket)
        self._qmp.settimeout(timeout)
        try:
            self._qmp.connect(negotiate=False)  # the greeting is read above, within the timeout
            self.execute("qmp_capabilities")
        except QMPError as error:
            self.close()
            raise SourceError(f"{description}: QMP negotiation with {self._where} failed: {error}") from None
        except BaseException:
            self.close()
            raise

    @property
    def unix(self) -> bool:
        """Whether the monitor is a unix socket, which can carry file descriptors."""
        return isinstance(self.address, str)

    @property
    def _where(self) -> str:
        return self.address if isinstance(self.address, str) else f"{self.address[0]}:{self.address[1]}"

    def _connect(self) -> socket.socket:
        """A socket to the monitor, once its peer has greeted as QMP."""
        where = self._where
        try:
            if isinstance(self.address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(self.address)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(self.address, self.timeout)
        except FileNotFoundError:
            raise SourceError(f"{self.description}: no socket at {where} (is QEMU running with "
                              f"-qmp unix:{where},server=on,wait=off?)") from None
        except OSError as error:
            raise SourceError(f"{self.description}: cannot connect to {where}: {error.strerror or error}") from None
        try:
            greeting = read_greeting(sock, timeout=self.timeout, description=self.description, where=where)
        except BaseException:
            sock.close()
            raise
        log.debug("%s -> greeting %.200s", self.description, greeting)
        sock.settimeout(None)
        return sock

    def _find_pid(self) -> int:
        if self.unix:
            return int(struct.unpack("3i", self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                   struct.calcsize("3i")))[0])
        pid = peer_pid(self._socket)
        if pid is None:
            self._socket.close()
            raise SourceError(f"{self.description}: QEMU is not a process on this host (or not one we may "
                              f"see); windump reads guest RAM only from a local QEMU: run it on QEMU's host")
        return pid

    # -- commands -----------------------------------------------------------------------------

    def execute(self, command: str, **arguments: object) -> Any:
        """Run a QMP command; QEMU's refusal or a lost connection becomes one SourceError line."""
        from qemu.qmp import ExecuteError, QMPError

        log.debug("%s <- %s %s", self.description, command, arguments or "")
        try:
            reply = self._qmp.cmd(command, **arguments)
        except ExecuteError as error:
            raise SourceError(f"{self.description}: QMP {command} failed: {error.error.error.desc}") from None
        except TimeoutError:
            raise SourceError(f"{self.description}: QEMU gave no answer to {command} "
                              f"within {self.timeout:g} s") from None
        except (QMPError, OSError, EOFError) as error:
            self.lost = True
            raise SourceError(f"{self.description}: lost the QMP connection during {command} (did QEMU quit?): "
                              f"{error or type(error).__name__}") from None
        except BaseException:  # Ctrl-C inside the client's event loop: the command's task goes quietly
            self._cancel_command()
            raise
        log.debug("%s -> %.200s", self.description, reply)
        return reply

    def query(self, command: str, *members: str) -> dict:
        """QMP ``command``'s reply, checked to be an object holding ``members``."""
        reply = self.execute(command)
        missing = [member for member in members if not isinstance(reply, dict) or member not in reply]
        if missing:
            raise SourceError(f"{self.description}: QMP {command} answered {str(reply)[:60]}, without {missing[0]!r}")
        return reply

    def hmp(self, command_line: str) -> str:
        """The output of an HMP command run through QMP's ``human-monitor-command``."""
        text = self.execute("human-monitor-command", **{"command-line": command_line})
        if not isinstance(text, str):
            raise SourceError(f"{self.description}: QMP human-monitor-command answered {str(text)[:60]}, not text")
        return text

    def _cancel_command(self) -> None:
        """Cancel and collect an interrupted command's task, so it does not die later with a
        traceback; the connection stays usable (QEMU's late reply is dropped), so ``cont`` still goes."""
        import asyncio

        loop = self._qmp._aloop  # the legacy client's own loop; it has no public name
        # The legacy client's _sync runs each command as a wait_for task; its reader and writer stay.
        tasks = [task for task in asyncio.all_tasks(loop)
                 if not task.done() and getattr(task.get_coro(), "__name__", "") == "wait_for"]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

    def mark_lost(self) -> None:
        """Say QEMU is gone (its process quit): nothing more is sent."""
        self.lost = True

    def clear_events(self) -> None:
        self._qmp.clear_events()

    def wait_event(self, seconds: float) -> None:
        """Wait up to ``seconds`` for any QMP event (what it is does not matter here)."""
        with contextlib.suppress(TimeoutError):
            self._qmp.pull_event(wait=seconds)

    # -- pausing ------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop the guest if it runs; :meth:`resume` restarts only a guest stopped here."""
        self.was_running = bool(self.query("query-status", "running")["running"])
        if self.was_running:
            self._paused_at = time.monotonic()  # first: a Ctrl-C while stop waits still resumes
            self.execute("stop")
            log.info("%s: guest paused", self.description)

    def resume(self) -> None:
        """Restart a guest :meth:`pause` stopped (once; not when QEMU is gone)."""
        if self._paused_at is None:
            return
        paused_at, self._paused_at = self._paused_at, None
        try:
            if not self.lost:
                self.execute("cont")
        finally:
            self._paused_for = time.monotonic() - paused_at
            log.info("%s: guest resumed after %.3f s paused", self.description, self._paused_for)

    @property
    def paused_seconds(self) -> float:
        """Seconds windump has kept the guest paused (so far, while it still is; 0 if it found it paused)."""
        if self._paused_at is not None:
            return time.monotonic() - self._paused_at
        return self._paused_for

    # -- file descriptors ---------------------------------------------------------------------

    def new_name(self) -> str:
        """A name no other descriptor or file of this connection has."""
        return f"windump-{os.getpid()}-{next(self._names)}"

    def pass_fd(self, fd: int) -> tuple[str, Callable[[], None]]:
        """Hand QEMU ``fd`` over the unix socket: the protocol string that names it, and an undo."""
        from qemu.qmp import QMPError

        name = self.new_name()
        try:
            self._qmp.send_fd_scm(fd)
        except (QMPError, OSError) as error:
            raise SourceError(f"{self.description}: cannot pass a file descriptor to QEMU: {error}") from None
        self.execute("getfd", fdname=name)

        def forget() -> None:  # QEMU keeps a passed fd until a dump takes it or closefd drops it
            with contextlib.suppress(SourceError):
                self.execute("closefd", fdname=name)

        return f"fd:{name}", forget

    def close(self) -> None:
        from qemu.qmp import QMPError

        with contextlib.suppress(QMPError, OSError, EOFError, RuntimeError):
            self._qmp.close()
        self._socket.close()
