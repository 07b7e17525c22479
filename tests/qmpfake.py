"""A stand-in for QEMU's QMP monitor, enough for the ``qmp:`` source: a unix socket served by a thread
of this process, whose guest RAM lives in this process too.

So ``SO_PEERCRED`` names this process, ``gpa2hva`` names the addresses of the RAM arrays here, and
the source's same-host path reads them with ``process_vm_readv`` as it reads a real QEMU's.
``dump-guest-memory`` writes QEMU-style ELFs (``tests/elfmaker.py``) into the descriptors passed
with ``getfd``, honouring ``begin``/``length`` and ``detach``; with ``shared`` the RAM is a
``memory-backend-file,share=on`` whose file the source can map. Every dump's arguments are kept in
:attr:`FakeQemu.dumps`, every command's name in :attr:`FakeQemu.commands`.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np
from elfmaker import write_qemu_elf


class FakeRam:
    """Guest RAM as the ELF writer reads it: ``ram`` ranges over one buffer of this process."""

    def __init__(self, ranges: list[tuple[int, int]], buffer: np.ndarray) -> None:
        self.ram = np.array(ranges, dtype=np.uint64).reshape(-1, 2)
        self.buffer = buffer
        self.offsets = np.concatenate(([0], np.cumsum(self.ram[:, 1] - self.ram[:, 0])))[:-1].astype(np.int64)

    def offset(self, address: int) -> int:
        index = int(np.searchsorted(self.ram[:, 0], np.uint64(address), side="right")) - 1
        return int(self.offsets[index]) + address - int(self.ram[index, 0])

    def readinto(self, address: int, buffer: memoryview) -> None:
        start = self.offset(address)
        np.frombuffer(buffer, np.uint8)[:] = self.buffer[start:start + len(buffer)]

    def read(self, address: int, length: int) -> bytes:
        start = self.offset(address)
        return self.buffer[start:start + length].tobytes()


class FakeQemu:
    """QEMU with ``guest``'s RAM (any object with ``ram`` and ``readinto``), vCPUs and note,
    listening on ``directory/qmp.sock``; paused unless ``running``."""

    def __init__(self, directory: Path, guest: object, *, running: bool = False, shared: bool = False,
                 vmcoreinfo: bytes | None = None) -> None:
        ranges = [(int(start), int(end)) for start, end in guest.ram]
        size = sum(end - start for start, end in ranges)
        self.block = "ram" if shared else "pc.ram"
        self.mem_path = None
        if shared:
            self.mem_path = directory / "guest-ram"
            self.mem_path.write_bytes(b"")
            os.truncate(self.mem_path, size)
            buffer = np.memmap(self.mem_path, dtype=np.uint8, mode="r+", shape=(size,))
        else:
            buffer = np.empty(size, dtype=np.uint8)
        self.memory = FakeRam(ranges, buffer)
        for start, end in ranges:
            offset = self.memory.offset(start)
            guest.readinto(start, memoryview(buffer[offset:offset + end - start]))
        self.cpus = list(getattr(guest, "cpu_states", []))
        self.note = guest.note if vmcoreinfo is None else vmcoreinfo
        self.running = running
        self.dumps: list[dict] = []
        self.commands: list[str] = []
        self._dump_status = "none"
        self._fds: dict[str, int] = {}
        self._received_fds: list[int] = []
        self._send_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.path = str(directory / "qmp.sock")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # -- the monitor --------------------------------------------------------------------------

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # closed by the test
            while True:
                connection, _ = self._server.accept()
                with connection:
                    self._talk(connection)

    def _send(self, connection: socket.socket, message: dict) -> None:
        with self._send_lock:
            connection.sendall(json.dumps(message).encode() + b"\r\n")

    def _talk(self, connection: socket.socket) -> None:
        self._send(connection, {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                                        "capabilities": []}})
        decoder, text = json.JSONDecoder(), ""
        with contextlib.suppress(OSError):
            while True:
                data, ancillary, _, _ = connection.recvmsg(1 << 16, socket.CMSG_SPACE(16))
                for level, kind, payload in ancillary:
                    if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                        fds = array.array("i")
                        fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                        self._received_fds += list(fds)
                if not data:
                    return
                text += data.decode()
                while text.strip():
                    text = text.lstrip()
                    try:
                        request, end = decoder.raw_decode(text)
                    except json.JSONDecodeError:
                        break
                    text = text[end:]
                    self._send(connection, self._answer(connection, request))

    def _answer(self, connection: socket.socket, request: dict) -> dict:
        command, arguments = request["execute"], request.get("arguments", {})
        self.commands.append(command)
        try:
            result = getattr(self, "_" + command.replace("-", "_"))(connection, **arguments)
        except ValueError as error:
            return {"error": {"class": "GenericError", "desc": str(error)}, "id": request.get("id")}
        return {"return": result, "id": request.get("id")}

    def _qmp_capabilities(self, connection: socket.socket) -> dict:
        return {}

    def _query_status(self, connection: socket.socket) -> dict:
        return {"running": self.running, "status": "running" if self.running else "paused"}

    def _stop(self, connection: socket.socket) -> dict:
        self.running = False
        return {}

    def _cont(self, connection: socket.socket) -> dict:
        self.running = True
        return {}

    def _query_dump(self, connection: socket.socket) -> dict:
        return {"status": self._dump_status, "completed": 0, "total": int(self.memory.buffer.size)}

    def _human_monitor_command(self, connection: socket.socket, **arguments: str) -> str:
        line = arguments["command-line"]
        if line == "info mtree -f":
            entries = "".join(f"  {start:016x}-{end - 1:016x} (prio 0, ram): {self.block} @{self.memory.offset(start):016x}\n"
                              for start, end in self.memory.ram.tolist())
            return f'FlatView #0\n AS "memory", root: system\n Root memory region: system\n{entries}\n'
        if line.startswith("gpa2hva "):
            address = int(line.split()[1], 16)
            host = self.memory.buffer.ctypes.data + self.memory.offset(address)
            return f"Host virtual address for {address:#x} ({self.block}) is {host:#x}\r\n"
        raise ValueError(f"unknown HMP command {line!r}")

    def _getfd(self, connection: socket.socket, fdname: str) -> dict:
        if not self._received_fds:
            raise ValueError("No file descriptor supplied via SCM_RIGHTS")
        self._fds[fdname] = self._received_fds.pop(0)
        return {}

    def _closefd(self, connection: socket.socket, fdname: str) -> dict:
        if fdname not in self._fds:
            raise ValueError(f"File descriptor named '{fdname}' not found")
        os.close(self._fds.pop(fdname))
        return {}

    def _qom_list(self, connection: socket.socket, path: str) -> list[dict]:
        if path == "/objects":
            return [{"name": "ram", "type": "child<memory-backend-file>"}] if self.mem_path else []
        if path == "/machine/peripheral":
            return [{"name": "vmcoreinfo", "type": "child<vmcoreinfo>"}]
        return []

    def _qom_get(self, connection: socket.socket, path: str, property: str) -> object:
        return {"mem-path": str(self.mem_path), "size": int(self.memory.buffer.size), "share": True}[property]

    # -- dump-guest-memory --------------------------------------------------------------------

    def _dump_guest_memory(self, connection: socket.socket, paging: bool, protocol: str, format: str = "elf",
                           detach: bool = False, begin: int | None = None, length: int | None = None) -> dict:
        if self._dump_status == "active":
            raise ValueError("there is a dump in process, please wait")
        kind, _, name = protocol.partition(":")
        fd = self._fds.pop(name) if kind == "fd" else os.open(name, os.O_WRONLY)
        self.dumps.append({"begin": begin, "length": length, "detach": detach})
        ranges = [(int(start), int(end)) for start, end in self.memory.ram.tolist()]
        if begin is not None:
            ranges = [(max(start, begin), min(end, begin + length)) for start, end in ranges
                      if start < begin + length and end > begin]
        self._dump_status = "active"
        if not detach:
            self._write_dump(connection, fd, ranges, event=False)
            return {}
        thread = threading.Thread(target=self._write_dump, args=(connection, fd, ranges))
        self._threads.append(thread)
        thread.start()
        return {}

    def _write_dump(self, connection: socket.socket, fd: int, ranges: list[tuple[int, int]], event: bool = True) -> None:
        status = "completed"
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "dump.elf"
            write_qemu_elf(path, self.memory, cpus=self.cpus, vmcoreinfo=self.note, ranges=ranges, qemu72_quirks=False)
            elf = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(elf).st_size
            offset = 0
            while offset < size:
                offset += os.sendfile(fd, elf, offset, size - offset)
        except OSError:  # the reader went away: QEMU's dump fails
            status = "failed"
        finally:
            os.close(elf)
            os.close(fd)
        self._dump_status = status
        if event:
            with contextlib.suppress(OSError):
                self._send(connection, {"event": "DUMP_COMPLETED", "data": {"result": {"status": status}},
                                        "timestamp": {"seconds": 0, "microseconds": 0}})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for thread in self._threads:
            thread.join(10)
        for fd in self._fds.values():
            os.close(fd)
        del self.memory
