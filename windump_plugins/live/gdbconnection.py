"""QEMU's gdbstub through the connection gdb already holds to it, for ``windump-save`` inside gdb
(QEMU serves one client at a time, so windump cannot open its own).

Control packets (``qqemu.Supported``, ``Qqemu.PhyMemMode``) go through
``RemoteTargetConnection.send_packet``, monitor commands through gdb's ``monitor`` (which collects
the ``O`` output packets that ``send_packet`` would leave behind), registers through gdb's frame
API, and ``m`` requests pipelined on a duplicate of gdb's socket, or gdb's ``read_memory``.
Nothing here resumes the guest. The ``gdb`` module is imported only when the adapter is used,
inside gdb's Python.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
from collections.abc import Sequence
from typing import Any

from ..errors import SourceError
from .rsp import QemuQueries, RemoteStub, parse_supported

#: The features gdb announces in its own ``qSupported``, repeated to learn the stub's PacketSize
#: without changing what gdb negotiated.
GDB_SUPPORTED = b"qSupported:multiprocess+;xmlRegisters=i386"

#: Bytes per ``read_memory`` call on the slowest path (gdb splits it into ``m`` packets itself).
READ_MEMORY_CHUNK = 1 << 20


def _tcp_endpoint(details: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``target remote`` argument (``HOST:PORT``, ``tcp:HOST:PORT``, ``:PORT``),
    None for pipes, serial lines and unix sockets."""
    for prefix in ("tcp:", "tcp4:", "tcp6:"):
        details = details.removeprefix(prefix)
    host, _, port = details.rpartition(":")
    if not port.isdigit() or "|" in details or details.startswith("/"):
        return None
    return host.strip("[]") or "localhost", int(port)


def _unmapped(address: str) -> str:
    return address.removeprefix("::ffff:")


def gdb_socket(host: str, port: int) -> socket.socket | None:
    """A duplicate of the socket in this process (gdb) connected to ``host:port``, or None.

    gdb does not expose its file descriptor, so each socket in ``/proc/self/fd`` is matched by its
    peer address. The duplicate shares gdb's open file, so it reads and writes the very same
    connection.
    """
    try:
        addresses = {_unmapped(str(info[4][0])) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return None
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            candidate = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            if candidate.family in (socket.AF_INET, socket.AF_INET6) and candidate.type == socket.SOCK_STREAM:
                peer = candidate.getpeername()
                if peer[1] == port and _unmapped(peer[0]) in addresses:
                    return candidate
        except OSError:
            pass
        candidate.close()
    return None


def _gdb() -> Any:
    """gdb's own Python module, which exists only inside gdb."""
    return importlib.import_module("gdb")


def register_value(value: Any) -> int | None:
    """A gdb register value as an unsigned integer of its raw bits (x87 registers too), None when
    unavailable. Vector registers are unions: their ``uint128`` member holds the bits."""
    if value.type.strip_typedefs().code == _gdb().TYPE_CODE_UNION:
        value = value["uint128"]
    try:
        return int(value.format_string(format="x"), 16)
    except ValueError:  # "<unavailable>"
        return None


class GdbConnection(QemuQueries):
    """QEMU's gdbstub through gdb's own connection, for :meth:`GdbStubSource.through`.

    Which channel serves what, and why:

    - control packets: ``send_packet``, gdb's synchronous one-packet exchange, so gdb stays in
      charge of its connection's state;
    - monitor commands: gdb's ``monitor``, because ``qRcmd`` answers with several packets;
    - registers: gdb's frame API, one thread per vCPU. Sending ``Hg``/``g`` behind gdb's back would
      leave gdb believing another thread is selected and showing one vCPU's registers as another's;
      through gdb they come from its register cache in the names of its target description. They
      are read once, before physical-memory mode, because gdb reads code memory to build frames;
    - guest RAM (when the source has no process-memory fast path): ``m`` requests pipelined on a
      duplicate of gdb's socket, 64 in flight, like :class:`RemoteStub`. ``send_packet`` and
      ``read_memory`` pay a round trip per 2 KiB packet (about 14 and 10 MiB/s here, gdb's own
      ``dump memory`` speed); pipelining is about ten times that. gdb reads nothing from its socket
      while a Python command runs, and every reply is read (and acked) before control returns to
      gdb, Ctrl-C included, so gdb finds its connection as it left it. Without a TCP socket (a pipe
      or serial line) ``read_memory`` is the fallback.
    """

    #: gdb attached, not windump: windump never resumes the guest.
    stopped_running_vm = False

    def __init__(self, timeout: float = 10.0) -> None:
        self._gdb = gdb = _gdb()
        inferior = gdb.selected_inferior()
        connection = inferior.connection
        if not isinstance(connection, gdb.RemoteTargetConnection):
            raise SourceError("gdb is not connected to a gdbstub: run 'target remote HOST:PORT' to QEMU's "
                              "-gdb port first")
        threads = inferior.threads()
        if not threads:
            raise SourceError(f"gdb's remote target {connection.details} has no threads (no vCPUs)")
        if any(thread.is_running() for thread in threads):
            raise SourceError("the guest is running: interrupt it in gdb first (windump reads a stopped VM)")
        self.address = connection.details or connection.type
        self._inferior = inferior
        self._connection = connection
        self.features = parse_supported(self.command(GDB_SUPPORTED))
        self.selected_cpu, self._registers = self._read_vcpu_registers(threads)
        endpoint = _tcp_endpoint(self.address)
        self._socket = None if endpoint is None else gdb_socket(*endpoint)
        self._bulk: RemoteStub | None = None
        if endpoint is not None and self._socket is not None:
            blocking = self._socket.getblocking()
            self._bulk = RemoteStub(*endpoint, timeout, connection=self._socket, features=self.features)
            os.set_blocking(self._socket.fileno(), blocking)  # gdb's file again as gdb had it

    def command(self, payload: bytes | str) -> bytes:
        try:
            return self._connection.send_packet(payload)
        except self._gdb.error as error:
            raise SourceError(f"gdb://{self.address}: {error}") from None

    def monitor(self, command: str) -> str:
        try:  # gdb passes QEMU's CRLF line ends through
            return self._gdb.execute(f"monitor {command}", to_string=True).replace("\r\n", "\n")
        except self._gdb.error as error:
            raise SourceError(f"gdb://{self.address}: monitor {command}: {error}") from None

    @property
    def connection(self) -> socket.socket | None:
        return self._socket

    def _read_vcpu_registers(self, threads: Sequence) -> tuple[int, list[dict[str, int]]]:
        """The index of gdb's selected thread among the vCPUs, and each vCPU's registers."""
        gdb = self._gdb
        selected, frame = gdb.selected_thread(), gdb.selected_frame()
        vcpus = sorted(threads, key=lambda thread: thread.ptid[:2])  # QEMU thread id = CPU index + 1
        states = []
        try:
            for thread in vcpus:
                thread.switch()
                newest = gdb.newest_frame()
                values = {r.name: register_value(newest.read_register(r.name))
                          for r in newest.architecture().registers("save")}
                states.append({name: value for name, value in values.items() if value is not None})
        finally:
            selected.switch()
            frame.select()
        return vcpus.index(selected), states

    def vcpu_registers(self) -> list[dict[str, int]]:
        return self._registers

    def readinto(self, address: int, buffer: memoryview) -> None:
        view = memoryview(buffer).cast("B")
        if self._bulk is None:
            for offset in range(0, len(view), READ_MEMORY_CHUNK):
                piece = view[offset : offset + READ_MEMORY_CHUNK]
                try:
                    piece[:] = self._inferior.read_memory(address + offset, len(piece))
                except self._gdb.error as error:
                    raise SourceError(f"gdb://{self.address}: {error}") from None
            return
        try:
            self._bulk.readinto(address, view)
        except BaseException:
            with contextlib.suppress(SourceError):
                self._bulk.settle()  # replies an interrupted pipeline left in flight: gdb must not see them
            raise
        self._bulk.settle()

    def read_memory(self, address: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.readinto(address, memoryview(buffer))
        return bytes(buffer)

    def detach(self) -> None:
        """Never: gdb holds the connection, and detaching would resume the guest under it."""

    def close(self) -> None:
        """Close our duplicate of gdb's socket and drop what gdb cached while memory was physical."""
        if self._socket is not None:
            self._socket.close()
        with contextlib.suppress(self._gdb.error):
            self._gdb.execute("maintenance flush dcache", to_string=True)
        self._gdb.invalidate_cached_frames()
