"""QEMU's ``dump-guest-memory`` (ELF, no paging) written into windump's own memfds and pipes, passed
with ``getfd``, or into a FIFO in a private directory when the monitor is on TCP (which carries no
file descriptors); and the dump's end and progress, from ``query-dump``."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator

from ..elffile import ElfSource
from ..errors import SourceError
from .elfstream import ElfStream
from .qmp import QmpConnection

log = logging.getLogger(__name__)

#: Pipe capacity asked for (the unprivileged maximum by default): fewer wake-ups while streaming.
PIPE_SIZE = 1 << 20

#: Seconds to wait for QEMU to finish a dump once its stream was read or abandoned.
DUMP_END_TIMEOUT = 60.0


class GuestMemoryDumps:
    """``dump-guest-memory`` through ``qmp``, into files QEMU cannot otherwise reach."""

    def __init__(self, qmp: QmpConnection) -> None:
        self.qmp = qmp
        self._fifo_dir: str | None = None

    def refuse_active(self) -> None:
        """Raise SourceError if QEMU is already writing a dump: it writes one at a time."""
        status = self.qmp.query("query-dump", "status", "completed", "total")
        if status["status"] == "active":
            raise SourceError(f"{self.qmp.description}: QEMU is already writing a dump ({status['completed']} of "
                              f"{status['total']} bytes); wait for it to finish, then try again")

    @contextlib.contextmanager
    def small_elf(self, begin: int, length: int) -> Iterator[ElfSource]:
        """QEMU's ELF of ``[begin, begin + length)``: every note and those bytes, in a memfd."""
        log.debug("%s: dump-guest-memory of %#x+%#x", self.qmp.description, begin, length)
        memfd = os.memfd_create("windump-qmp", os.MFD_CLOEXEC)
        try:
            if self.qmp.unix:
                protocol, forget = self.qmp.pass_fd(memfd)
                try:
                    self._dump(protocol, begin=begin, length=length)
                except BaseException:
                    forget()
                    raise
            else:
                stream = self.start_stream(begin=begin, length=length, parse=False)
                try:
                    stream.copy_to(memfd)
                finally:
                    stream.close()
                    self.wait_end()
            source = ElfSource(f"/proc/self/fd/{memfd}")
        finally:
            os.close(memfd)
        source.description = f"{self.qmp.description} (dump-guest-memory of {begin:#x}+{length:#x})"
        try:
            yield source
        finally:
            source.close()

    def start_stream(self, *, parse: bool = True, **arguments: object) -> ElfStream:
        """Start QEMU's detached ELF dump into a pipe (or FIFO) and return its read end as a stream."""
        fifo = None
        if self.qmp.unix:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):
                fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            try:
                protocol, forget = self.qmp.pass_fd(write_fd)
            except BaseException:
                os.close(read_fd)
                raise
            finally:
                os.close(write_fd)
        else:
            fifo, read_fd = self._fifo()
            protocol, forget = f"file:{fifo}", _nothing
        try:
            self._dump(protocol, detach=True, **arguments)
        except BaseException:
            forget()
            os.close(read_fd)
            raise
        finally:
            if fifo is not None:  # QEMU opened it (dump-guest-memory returns after): nobody else may now
                os.unlink(fifo)
        return ElfStream(read_fd, self.qmp.description, parse=parse)

    def _dump(self, protocol: str, *, detach: bool = False, **arguments: object) -> None:
        self.qmp.clear_events()
        self.qmp.execute("dump-guest-memory", paging=False, protocol=protocol, format="elf", detach=detach, **arguments)
        if not detach:
            self.qmp.clear_events()

    def _fifo(self) -> tuple[str, int]:
        """A FIFO QEMU on this host opens by path (:func:`fifo_modes`): its path and our read end."""
        directory_mode, fifo_mode, owner = fifo_modes(*_effective_ids(self.qmp.pid))
        if self._fifo_dir is None:
            self._fifo_dir = tempfile.mkdtemp(prefix="windump-qmp-")
            os.chmod(self._fifo_dir, directory_mode)
            if owner is not None:
                os.chown(self._fifo_dir, *owner)
        path = os.path.join(self._fifo_dir, secrets.token_hex(16))
        os.mkfifo(path, 0o600)
        os.chmod(path, fifo_mode)
        if owner is not None:
            os.chown(path, *owner)
        read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(read_fd, True)
        return path, read_fd

    def wait_end(self) -> None:
        """Wait for QEMU's DUMP_COMPLETED; a failed dump is only an error if we still wanted it."""
        deadline = time.monotonic() + DUMP_END_TIMEOUT
        while self.qmp.query("query-dump", "status")["status"] == "active":
            if time.monotonic() > deadline:
                raise SourceError(f"{self.qmp.description}: QEMU's dump did not end within {DUMP_END_TIMEOUT:g} s")
            self.qmp.wait_event(0.05)
        self.qmp.clear_events()

    def progress(self) -> tuple[int, int]:
        """``(completed, total)`` bytes of the dump QEMU is writing, from ``query-dump``."""
        status = self.qmp.query("query-dump", "completed", "total")
        return int(status["completed"]), int(status["total"])

    def close(self) -> None:
        """Remove the FIFOs' directory, if any."""
        if self._fifo_dir is not None:
            shutil.rmtree(self._fifo_dir, True)
            self._fifo_dir = None


def fifo_modes(qemu_uid: int, qemu_gid: int) -> tuple[int, int, tuple[int, int] | None]:
    """``(directory mode, FIFO mode, owner for both or None)``: the narrowest that lets QEMU's user
    open a FIFO of ours for writing. QEMU as us: 0700 and 0600. QEMU as another user (libvirt's
    ``libvirt-qemu``) while we are root: both owned by that user, 0700 and 0600 (root reads anyway).
    Otherwise only others' write bit serves: 0711 and 0602, under a random name nobody can list."""
    if qemu_uid == os.geteuid():
        return 0o700, 0o600, None
    if os.geteuid() == 0 and qemu_uid >= 0:
        return 0o700, 0o600, (qemu_uid, qemu_gid)
    return 0o711, 0o602, None


def _effective_ids(pid: int) -> tuple[int, int]:
    """QEMU's effective user and group, as it opens files (``/proc/PID``'s owner may be root for a
    process that changed its user, such as QEMU under ``-runas``), or ``(-1, -1)`` when not ours to see."""
    ids = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("Uid:", "Gid:")):
                    ids[line[:3]] = int(line.split()[2])
    except (OSError, ValueError, IndexError):
        return -1, -1
    return ids.get("Uid", -1), ids.get("Gid", -1)


def _nothing() -> None:
    """Nothing to undo: QEMU opened the FIFO by its path."""
