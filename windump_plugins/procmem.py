"""Reads of a QEMU process's memory on this host through ``/proc/PID/mem``: guest RAM at memory speed.

QEMU maps guest RAM into its own address space; ``gpa2hva`` names where, and the process that owns
the other end of our gdbstub connection is the QEMU to read.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .errors import SourceError


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


class ProcessMemory:
    """Another process's memory, read with ``pread`` on ``/proc/PID/mem`` (needs ptrace rights)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise SourceError(f"cannot open the memory of process {pid}: {error.strerror}") from None

    def readinto(self, address: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from the process's virtual ``address``."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            try:
                count = os.preadv(self._fd, [view[done:]], address + done)
            except OSError as error:
                raise SourceError(f"cannot read process {self.pid} at {address + done:#x}: {error.strerror}") from None
            if count == 0:
                raise SourceError(f"cannot read process {self.pid} at {address + done:#x}: the mapping ends there")
            done += count

    def close(self) -> None:
        os.close(self._fd)
