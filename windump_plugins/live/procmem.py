"""Reads of a QEMU process's memory on this host: guest RAM at memory speed.

QEMU maps guest RAM into its own address space; ``gpa2hva`` names where, and the process that owns
the other end of our gdbstub connection is the QEMU to read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path

from ..errors import SourceError


def _proc_net_address(address: tuple) -> str:
    """``ip:port`` the way ``/proc/net/tcp`` and ``tcp6`` print it: each 32-bit word in host order."""
    host, port = address[0], address[1]
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host)
    else:
        packed = socket.inet_aton(host)
    words = [packed[i : i + 4] for i in range(0, len(packed), 4)]
    return "".join(int.from_bytes(word, "little").to_bytes(4, "big").hex().upper() for word in words) + f":{port:04X}"


def _socket_inode(connection: socket.socket) -> int | None:
    """The inode of the socket at the other end of ``connection`` when that end is on this host."""
    ours = _proc_net_address(connection.getsockname())
    theirs = _proc_net_address(connection.getpeername())
    table = "/proc/net/tcp6" if connection.family == socket.AF_INET6 else "/proc/net/tcp"
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if fields[1] == theirs and fields[2] == ours:
            return int(fields[9])
    return None


def peer_accepted(connection: socket.socket) -> bool | None:
    """Whether the listener on this host has accepted TCP ``connection`` (a queued one has no inode
    yet); None when its end is not on this host."""
    inode = _socket_inode(connection)
    return None if inode is None else inode != 0


def peer_pid(connection: socket.socket) -> int | None:
    """The PID of the local process holding the other end of TCP ``connection``, or None.

    None when the peer is on another host (or in another network namespace), or when its file
    descriptors are not ours to see.
    """
    inode = _socket_inode(connection)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == target:
                    return int(entry.name)
        except OSError:  # gone, or not ours to look at
            continue
    return None


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def _process_vm_readv() -> Callable[..., int] | None:
    """libc's ``process_vm_readv``, or None where the C library lacks it."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "process_vm_readv", None)
    if function is not None:
        function.restype = ctypes.c_ssize_t
        function.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                             ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
    return function


class ProcessMemory:
    """Another process's memory (needs ptrace rights over it).

    ``process_vm_readv`` copies straight from the other process's pages into ours, twice as fast as
    ``pread`` on ``/proc/PID/mem``, which goes through a kernel bounce page (7 against 3.5 GB/s
    here). ``/proc/PID/mem`` stays open: opening it checks the rights up front, and it serves where a
    seccomp filter or the C library denies the call.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise SourceError(f"cannot open the memory of process {pid}: {error.strerror}") from None
        self._vm_readv = _process_vm_readv()

    def readinto(self, address: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from the process's virtual ``address``."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            count = self._read_some(address + done, view[done:])
            if count == 0:
                raise SourceError(f"cannot read process {self.pid} at {address + done:#x}: the mapping ends there")
            done += count

    def _read_some(self, address: int, view: memoryview) -> int:
        if self._vm_readv is not None:
            target = (ctypes.c_char * len(view)).from_buffer(view)
            local, remote = _IoVec(ctypes.addressof(target), len(view)), _IoVec(address, len(view))
            count = self._vm_readv(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
            del target  # lets the caller release or close the buffer behind ``view``
            if count >= 0:
                return count
            code = ctypes.get_errno()
            if code == errno.EFAULT:
                return 0
            if code not in (errno.ENOSYS, errno.EPERM):
                raise SourceError(f"cannot read process {self.pid} at {address:#x}: {os.strerror(code)}")
            self._vm_readv = None  # refused by policy, not by rights: /proc/PID/mem opened
        try:
            return os.preadv(self._fd, [view], address)
        except OSError as error:
            raise SourceError(f"cannot read process {self.pid} at {address:#x}: {error.strerror}") from None

    def close(self) -> None:
        os.close(self._fd)
