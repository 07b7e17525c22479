"""The ``gdb://`` source against a real QEMU (no guest OS: memory and registers are seeded through the
stub by the test itself), plus location parsing, mtree parsing and the non-QEMU and plugin paths."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from gate import require
from qemu.qmp import ConnectError, QMPClient

from windump_plugins import notescan
from windump_plugins.errors import SourceError, WindumpWarning
from windump_plugins.formats.vmcoreinfo import find_notes
from windump_plugins.live import procmem
from windump_plugins.live.phymemmode import PhyMemMode
from windump_plugins.live.procmem import ProcessMemory, peer_pid
from windump_plugins.live.rsp import RemoteStub
from windump_plugins.live.rspmemory import PipelinedReads
from windump_plugins.live.rsppacket import frame
from windump_plugins.live.rspwire import RspWire
from windump_plugins.plugins import Plugins
from windump_plugins.source import Access
from windump_plugins.sources import gdbstub
from windump_plugins.sources.gdbstub import (
    GdbStubSource,
    parse_debug_registers,
    parse_location,
)

QEMU = shutil.which("qemu-system-x86_64")
MiB = 1 << 20


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


class Qemu:
    """A diskless 64 MiB, 2-vCPU QEMU with a gdbstub on loopback and QMP on a unix socket."""

    def __init__(self, directory, *, start_stopped=True) -> None:
        require("qemu-system-x86_64")
        self.port = free_port()
        directory.mkdir()
        self.qmp_path = str(directory / "qmp.sock")
        command = [QEMU, "-machine", "pc,accel=tcg", "-m", "64M", "-smp", "2", "-nodefaults",
                   "-display", "none", "-gdb", f"tcp:127.0.0.1:{self.port}",
                   "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.process = subprocess.Popen(command + (["-S"] if start_stopped else []), stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        self.location = f"gdb://127.0.0.1:{self.port}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while True:  # QMP answers once QEMU's main loop runs, the gdbstub listening by then
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"QEMU did not start (exit status {self.process.poll()})")
            if os.path.exists(self.qmp_path):
                with contextlib.suppress(OSError, ConnectError):
                    self.status()
                    return
            time.sleep(0.05)

    def qmp(self, command: str, **arguments):
        async def run():
            client = QMPClient()
            await client.connect(self.qmp_path)
            try:
                return await client.execute(command, arguments or None)
            finally:
                await client.disconnect()

        return asyncio.run(run())

    def status(self) -> str:
        return self.qmp("query-status")["status"]

    def pmemsave(self, tmp_path, address: int, length: int) -> bytes:
        path = tmp_path / f"pmem-{address:x}"
        self.qmp("pmemsave", val=address, size=length, filename=str(path))
        return path.read_bytes()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def qemu(tmp_path):
    machine = Qemu(tmp_path / "stopped")
    yield machine
    machine.close()


@pytest.fixture
def running_qemu(tmp_path):
    machine = Qemu(tmp_path / "running", start_stopped=False)
    yield machine
    machine.close()


def seed(location: str, address: int, data: bytes) -> None:
    """Write ``data`` to guest physical memory with ``M`` packets (tests only: windump never writes)."""
    host, port = location.removeprefix("gdb://").split(":")
    with RemoteStub(host, int(port)) as stub, PhyMemMode(stub):
        step = stub.packet_size // 2 - 32
        for offset in range(0, len(data), step):
            piece = data[offset : offset + step]
            assert stub.command(b"M%x,%x:%s" % (address + offset, len(piece), piece.hex().encode())) == b"OK"


def phy_mem_mode(location: str) -> int:
    host, port = location.removeprefix("gdb://").split(":")
    with RemoteStub(host, int(port)) as stub:
        return stub.phy_mem_mode()


# --- no QEMU needed -------------------------------------------------------------------------------

def interrupt_third_parse(monkeypatch) -> list[int]:
    """Ctrl-C at the third batch of ``m`` replies parsed, with more still in flight; returns the
    list that counts the batches."""
    parse = PipelinedReads._parse_memory_replies
    calls = []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return parse(self, *args)

    monkeypatch.setattr(PipelinedReads, "_parse_memory_replies", interrupted)
    return calls


#: HMP ``info registers -a`` as QEMU prints it (abridged): vCPU 0 in long mode with AVX enabled (YMM
#: lines), vCPU 1 in protected mode (8-digit registers where the target is 32-bit wide), vCPU 2's
#: block cut before its debug registers.
INFO_REGISTERS_A = """
CPU#0
RAX=0000000000000001 RBX=0000000000000002 RCX=0000000000000003 RDX=0000000000000004
RIP=fffff80000001000 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CS =0010 0000000000000000 00000000 00209b00 DPL=0 CS64 [-RA]
CR0=80050033 CR2=0000000000000000 CR3=00000000001ad000 CR4=000006f8
DR0=fffff80000008000 DR1=fffff80000008008 DR2=fffff80000008010 DR3=fffff80000008018 \nDR6=00000000ffff0ff0 DR7=0000000000000401
EFER=0000000000000d01
FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80
YMM00=0000000000000000 0000000000000000 0123456789abcdef fedcba9876543210

CPU#1
EAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1
CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000
DR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000 DR3=0000000000000000 \nDR6=00000000ffff0ff0 DR7=0000000000000400
XMM00=0000000000000000 0000000000000000 XMM01=0000000000000000 0000000000000000

CPU#2
EAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1
DR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000
""".replace("\\n", "\n")


def test_debug_registers_from_info_registers():
    blocks = parse_debug_registers(INFO_REGISTERS_A)
    assert [index for index, _ in blocks] == [0, 1, 2]
    assert blocks[0][1] == {"dr0": 0xFFFFF80000008000, "dr1": 0xFFFFF80000008008, "dr2": 0xFFFFF80000008010,
                            "dr3": 0xFFFFF80000008018, "dr6": 0xFFFF0FF0, "dr7": 0x401}
    assert blocks[1][1] == {"dr0": 0, "dr1": 0, "dr2": 0, "dr3": 0, "dr6": 0xFFFF0FF0, "dr7": 0x400}
    assert blocks[2][1] == {}  # DR3, DR6 and DR7 missing: none rather than some
    assert parse_debug_registers("registers: unsupported option -a\n") == []

def test_location_options():
    assert parse_location("elf:guest.elf") is None
    assert parse_location("gdb://[::1]:1234?keep-stopped&header-pa=0x7fe000") == {
        "host": "::1", "port": 1234, "keep_stopped": True, "header_pa": 0x7FE000, "packets": False, "timeout": 10.0,
    }
    with pytest.raises(SourceError, match="unknown option 'keepstopped'"):
        parse_location("gdb://localhost:1234?keepstopped")
    with pytest.raises(SourceError, match="expected gdb://HOST:PORT"):
        parse_location("gdb://localhost")


def note(magic: bytes = b"DU64", marker: bytes = b"") -> bytes:
    size = 0x2000 if magic == b"DU64" else 0x1000
    header = np.array([11, size, 0], dtype="<u4").tobytes() + b"VMCOREINFO\0\0"
    body = (b"PAGE" + magic + marker).ljust(size, b"\x5a")
    return header + body


def test_find_notes_checks_the_whole_header():
    chunk = np.zeros(0x10000, dtype=np.uint8)
    good, x86 = note(), note(b"DUMP")
    bad_size = bytearray(note())
    bad_size[4:8] = (0x1000).to_bytes(4, "little")  # DU64 needs 0x2000
    for offset, data in ((0x1004, bytes(bad_size[:64])), (0x2004, good[:64]), (0x6000, x86[:64]), (0xFFE0, good[:32])):
        chunk[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
    assert find_notes(chunk) == [0x2004, 0x6000, 0xFFE0]
    assert find_notes(chunk[:0xFFE4]) == [0x2004, 0x6000]  # a cut header waits for the next chunk


def test_peer_pid_finds_the_local_listener():
    # The accepted socket is in the server's file table only once accept() returned: it says when.
    script = ("import socket,sys; s=socket.create_server(('127.0.0.1',0)); print(s.getsockname()[1], flush=True); "
              "c=s.accept()[0]; print('accepted', flush=True); c.recv(1)")
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as connection:
            assert server.stdout.readline() == "accepted\n"
            assert peer_pid(connection) == server.pid
    finally:
        server.kill()
        server.wait()


def test_process_memory_reads_and_refuses_holes():
    data = np.frombuffer(os.urandom(3 * 4096), dtype=np.uint8).copy()
    process = ProcessMemory(os.getpid())
    try:
        copy = bytearray(len(data))
        process.readinto(data.ctypes.data, memoryview(copy))
        assert copy == data.tobytes()
        with pytest.raises(SourceError, match=r"cannot read process \d+ at 0x1000:"):
            process.readinto(0x1000, memoryview(copy))  # the zero page is never mapped
    finally:
        process.close()


def test_process_memory_falls_back_to_proc_mem_when_the_call_is_denied():
    """A seccomp filter that denies process_vm_readv (EPERM) leaves /proc/PID/mem to read with."""
    data = np.frombuffer(os.urandom(2 * 4096), dtype=np.uint8).copy()
    process = ProcessMemory(os.getpid())
    calls = []

    def denied(*arguments):
        calls.append(arguments)
        ctypes.set_errno(errno.EPERM)
        return -1

    process._vm_readv = denied
    try:
        copy = bytearray(len(data))
        process.readinto(data.ctypes.data, memoryview(copy))
        process.readinto(data.ctypes.data, memoryview(copy))
        assert copy == data.tobytes()
        assert len(calls) == 1  # asked once, then /proc/PID/mem for good
    finally:
        process.close()


# --- real QEMU -------------------------------------------------------------------------------------

def open_through_plugin_manager(location: str):
    """Open ``location`` as windump does, with this module registered by hand (no entry point yet)."""
    plugins = Plugins()
    plugins.register(gdbstub, "gdb")
    assert [kind.pattern.split("[")[0] for kind in plugins.kinds()] == ["gdb://HOST:PORT"]
    return plugins.open_source(location)


@pytest.mark.qemu
def test_ram_map_reads_and_paths_agree_with_pmemsave(qemu, tmp_path):
    pattern = os.urandom(0x3000)
    seed(qemu.location, 0x1FFF800, pattern)  # crosses page and packet boundaries
    address, length = 0x1FF0000, 0x20000
    expected = qemu.pmemsave(tmp_path, address, length)
    assert expected[0xF800:0x12800] == pattern
    with open_through_plugin_manager(qemu.location) as fast:  # QEMU serves one client at a time
        assert fast.access() == Access("procmem", {}, 0.0)  # -S: QEMU was not running
        ram = fast.ram
        assert fast.read(address, length) == expected
    assert ram.dtype == np.uint64
    assert int(ram[-1, 1]) == 64 * MiB  # -m 64M: RAM to 64 MiB, minus the ROM shadow below 1 MiB
    assert int((ram[:, 1] - ram[:, 0]).sum()) == 64 * MiB - 0x40000
    with GdbStubSource("127.0.0.1", qemu.port, packets=True) as slow:
        assert slow.access() == Access("packets", {"procmem": "not tried: packets was asked for"}, 0.0)
        assert np.array_equal(slow.ram, ram)
        assert slow.read(address, length) == expected
        with pytest.raises(SourceError, match="not in guest RAM"):
            slow.read(0xC0000, 0x1000)
    assert phy_mem_mode(qemu.location) == 0


@pytest.mark.qemu
def test_fast_path_falls_back_to_packets(qemu, monkeypatch):
    seed(qemu.location, 0x200000, b"fallback")
    seed(qemu.location, 0, b"page zero")
    monitor = RemoteStub.monitor

    def next_page(self, command):  # gpa2hva answers for the page after the one asked
        if command.startswith("gpa2hva "):
            command = f"gpa2hva {int(command.split()[1], 16) + 0x1000:#x}"
        return monitor(self, command)

    failures = [
        (gdbstub, "peer_pid", lambda connection: None, "not a process on this host"),
        (procmem.ProcessMemory, "__init__", lambda self, pid: (_ for _ in ()).throw(SourceError("no ptrace rights")), "no ptrace rights"),
        (RemoteStub, "monitor", next_page, "the first page at 0x0 differs from what the stub reads there"),
    ]
    for owner, name, replacement, reason in failures:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, replacement)
            with GdbStubSource("127.0.0.1", qemu.port) as source:
                access = source.access()
                assert (access.path, source.qemu_pid, list(access.passed_over)) == ("packets", None, ["procmem"])
                assert reason in access.passed_over["procmem"]
                assert source.read(0x200000, 8) == b"fallback"


@pytest.mark.qemu
def test_phy_mem_mode_restored_after_errors(qemu, monkeypatch):
    host, port = "127.0.0.1", qemu.port
    seed(qemu.location, 0x100000, b"\xa5" * 0x10000)
    with RemoteStub(host, port) as stub:
        stub.set_phy_mem_mode(1)
        with pytest.raises(RuntimeError), PhyMemMode(stub, mode=0):
            assert stub.phy_mem_mode() == 0
            raise RuntimeError("injected")
        assert stub.phy_mem_mode() == 1
        stub.set_phy_mem_mode(0)

        # Ctrl-C in the middle of a pipelined read: replies still in flight are drained first.
        calls = interrupt_third_parse(monkeypatch)
        with pytest.raises(KeyboardInterrupt), PhyMemMode(stub):
            stub.read_memory(0x100000, 0x100000)  # at least 0x100000 / 0x800 / READ_WINDOW batches
        monkeypatch.undo()
        assert stub.phy_mem_mode() == 0
        with PhyMemMode(stub):
            assert stub.read_memory(0x100000, 0x10000) == b"\xa5" * 0x10000
        assert len(calls) == 3

    monkeypatch.setattr(gdbstub, "parse_ram_map", lambda text: (_ for _ in ()).throw(SourceError("injected")))
    with pytest.raises(SourceError, match="injected"):
        GdbStubSource(host, port)
    assert phy_mem_mode(qemu.location) == 0


@pytest.mark.qemu
def test_registers_of_two_vcpus(qemu):
    host, port = "127.0.0.1", qemu.port
    # Give each vCPU its own values (test only). Outside 64-bit code, as here at reset, QEMU keeps
    # only the low 32 bits of general registers, bases and control registers (sign-extended).
    with RemoteStub(host, port) as stub:
        numbers = {register.name: register.regnum for register in stub.registers()}
        threads = stub.threads()
        assert len(threads) == 2
        for index, thread in enumerate(threads):
            stub.select_thread(thread)
            for name, value, size in (("rax", 0x11111111 * (index + 1), 8), ("k_gs_base", 0x7654321 + index, 8),
                                      ("xmm3", (index + 1) << 120 | 0xABCDEF, 16), ("mxcsr", 0x1F80 + index, 4)):
                assert stub.command(b"P%x=%s" % (numbers[name], value.to_bytes(size, "little").hex().encode())) == b"OK"
    with GdbStubSource(host, port) as source:
        cpus = source.cpus()
    assert [cpu.index for cpu in cpus] == [0, 1]
    for index, cpu in enumerate(cpus):
        registers = cpu.registers
        assert registers["rax"] == 0x11111111 * (index + 1)
        assert registers["kernel_gs_base"] == 0x7654321 + index
        assert registers["xmm3"] == (index + 1) << 120 | 0xABCDEF
        assert registers["mxcsr"] == 0x1F80 + index
        # Reset state of an x86 CPU: CS selector 0xf000, RIP 0xfff0, CR0 0x60000010, EFLAGS bit 1.
        assert (registers["cs"], registers["rip"], registers["cr0"], registers["rflags"]) == (0xF000, 0xFFF0, 0x60000010, 2)
        assert {"fs_base", "gs_base", "cr3", "cr4", "efer", "r15", "xmm15"} <= registers.keys()



@pytest.mark.qemu
def test_debug_registers_come_from_hmp(qemu, monkeypatch):
    """The stub has no debug registers: HMP's are merged in, at the architectural reset values
    (DR6 0xFFFF0FF0, DR7 0x400), and the monitor's selected CPU is left as it was."""
    with GdbStubSource("127.0.0.1", qemu.port) as source:
        assert not any(register.name.startswith("dr") for register in source.stub.registers())
        source.stub.monitor("cpu 1")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cpus = source.cpus()
        assert [(cpu.registers["dr0"], cpu.registers["dr3"], cpu.registers["dr6"], cpu.registers["dr7"])
                for cpu in cpus] == [(0, 0, 0xFFFF0FF0, 0x400)] * 2
        assert "* CPU #1" in source.stub.monitor("info cpus")
        source.stub.monitor("cpu 0")
        monkeypatch.setattr(source.stub, "monitor", lambda command: INFO_REGISTERS_A.split("CPU#1")[0])
        with pytest.warns(WindumpWarning, match=r'HMP "info registers -a" shows 1 vCPUs, the stub 2: no processor CONTEXT'):
            cpus = source.cpus()
        assert not any(name.startswith("dr") for cpu in cpus for name in cpu.registers)
        assert cpus[1].registers["cs"] == 0xF000  # the stub's registers are still there
        cpu1 = "CPU#1" + INFO_REGISTERS_A.split("CPU#1")[1].split("CPU#2")[0]
        monkeypatch.setattr(source.stub, "monitor", lambda command: "CPU#0\nRAX=0\n" + cpu1)
        with pytest.warns(WindumpWarning, match="shows no DR0-3, DR6 and DR7 for vCPU 0: its CONTEXT"):
            cpus = source.cpus()
        assert "dr7" not in cpus[0].registers and cpus[1].registers["dr7"] == 0x400

@pytest.mark.qemu
def test_vmcoreinfo_is_found_in_ram(qemu, monkeypatch):
    published = note(marker=b"published")
    address = 0x2345674  # 4-byte aligned only
    seed(qemu.location, address, published)
    monkeypatch.setattr(notescan, "SCAN_CHUNK", 0x100000)
    with GdbStubSource("127.0.0.1", qemu.port) as source:
        assert source.vmcoreinfo() == published
        assert source.vmcoreinfo_address == address
    with GdbStubSource("127.0.0.1", qemu.port, packets=True, header_pa=address) as source:
        assert source.vmcoreinfo() == published
    with GdbStubSource("127.0.0.1", qemu.port, header_pa=address + 24) as source:  # the dump header's address
        assert source.vmcoreinfo() == published and source.vmcoreinfo_address == address
    with GdbStubSource("127.0.0.1", qemu.port, header_pa=address + 4) as source:
        with pytest.raises(SourceError, match="no VMCOREINFO note"):
            source.vmcoreinfo()


@pytest.mark.qemu
def test_note_across_a_scan_chunk_boundary(qemu, monkeypatch):
    published = note(b"DUMP", marker=b"x86")
    monkeypatch.setattr(notescan, "SCAN_CHUNK", 0x100000)
    seed(qemu.location, 0x300000 - 12, published)  # starts 12 bytes before a chunk ends
    with GdbStubSource("127.0.0.1", qemu.port) as source:
        assert source.vmcoreinfo() == published


@pytest.mark.qemu
def test_no_note_in_a_fresh_guest(qemu):
    with GdbStubSource("127.0.0.1", qemu.port) as source:
        assert source.vmcoreinfo() is None


@pytest.mark.qemu
def test_vm_left_as_found(running_qemu, qemu):
    assert running_qemu.status() == "running"
    with GdbStubSource("127.0.0.1", running_qemu.port):
        assert running_qemu.status() == "paused"
    assert running_qemu.status() == "running"
    with GdbStubSource("127.0.0.1", running_qemu.port) as source:  # resumed once reading is done
        source.reading_done()
        assert running_qemu.status() == "running"
        assert 0 < source.access().paused_seconds < 30
    with GdbStubSource("127.0.0.1", running_qemu.port, keep_stopped=True):
        pass
    assert running_qemu.status() == "paused"
    # A VM someone else stopped (here: never started, -S) stays stopped.
    with GdbStubSource("127.0.0.1", qemu.port):
        pass
    assert qemu.status() == "prelaunch"


@pytest.mark.qemu
def test_dropped_connection_is_a_source_error(qemu):
    with GdbStubSource("127.0.0.1", qemu.port, packets=True) as source:
        qemu.close()
        with pytest.raises(SourceError, match=r"^gdb://127\.0\.0\.1:\d+: (the stub closed the connection|connection lost)"):
            source.read(0x100000, 0x100000)
        with contextlib.suppress(SourceError):
            source.close()


# --- leaving QEMU as found when the connection fails (a scripted stub, no QEMU needed) -------------

class PersistentStub:
    """QEMU's gdbstub as far as the ``gdb://`` source needs it, on 127.0.0.1, serving connections
    one after another with QEMU's global state (PhyMemMode, running) kept across them.
    ``drop_after`` hangs up the first connection at that ``m`` request; ``connections`` limits
    how many are accepted."""

    FRAME = re.compile(rb"\$([^#]*)#[0-9a-f]{2}")

    def __init__(self, *, running: bool, drop_after: int | None = None, connections: int = 2) -> None:
        self.phy_mem_mode, self.running, self.drop_after = 0, running, drop_after
        self.accepted, self.reads = 0, 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, args=(connections,), daemon=True)
        self._thread.start()

    def _serve(self, connections: int) -> None:
        with self._server, contextlib.suppress(OSError):  # closed by the test: no more connections
            for _ in range(connections):
                connection, _ = self._server.accept()
                self.accepted += 1
                greeting, self.running = self.running, False  # attaching stops a running VM
                with connection, contextlib.suppress(OSError):
                    self._talk(connection, greeting)

    def _talk(self, connection: socket.socket, greeting: bool) -> None:
        if greeting:
            connection.sendall(frame(b"T02thread:p01.01;"))
        received = b""
        while True:
            while (match := self.FRAME.search(received)) is None:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                received += chunk
            received = received[match.end():]
            reply = self._answer(match[1])
            if reply is None:
                return
            connection.sendall(b"+" + reply)

    def _answer(self, payload: bytes) -> bytes | None:
        if payload.startswith(b"m"):
            self.reads += 1
            if self.reads == self.drop_after:
                return None
            address, length = (int(x, 16) for x in payload[1:].split(b","))
            return frame(b"00" * length)
        if payload.startswith(b"qRcmd,"):
            mtree = 'FlatView #0\n AS "memory", root: system\n  0000000000000000-00000000003fffff (prio 0, ram): pc.ram\n'
            return frame(b"O" + mtree.encode().hex().encode()) + frame(b"OK")
        if payload.startswith(b"Qqemu.PhyMemMode:"):
            self.phy_mem_mode = int(payload.split(b":")[1])
            return frame(b"OK")
        if payload.startswith(b"D"):
            self.running = True
            return frame(b"OK")
        return frame({
            b"qSupported": b"PacketSize=1000;qXfer:features:read+",
            b"qqemu.Supported": b"sstepbits;sstep;PhyMemMode",
            b"qqemu.PhyMemMode": b"%d" % self.phy_mem_mode,
            b"qfThreadInfo": b"mp01.01",
            b"qsThreadInfo": b"l",
        }.get(payload.split(b":")[0], b""))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes a pending accept (Linux)
        self._thread.join(5)
        assert not self._thread.is_alive()


@pytest.fixture
def persistent_stub():
    stubs = []

    def start(**options) -> PersistentStub:
        stubs.append(PersistentStub(**options))
        return stubs[-1]

    yield start
    for stub in stubs:
        stub.close()


def test_lost_connection_restores_phymemmode_and_resumes_over_a_fresh_one(persistent_stub):
    stub = persistent_stub(running=True, drop_after=40)
    source = GdbStubSource("127.0.0.1", stub.port, packets=True)
    assert (stub.phy_mem_mode, source.stub.stopped_running_vm) == (1, True)
    with pytest.raises(SourceError, match="the stub closed the connection|connection lost"):
        source.read(0, 0x100000)
    source.close()
    assert (stub.accepted, stub.phy_mem_mode, stub.running) == (2, 0, True)


def test_failed_reconnection_is_in_the_error(persistent_stub):
    stub = persistent_stub(running=False, drop_after=40, connections=1)
    source = GdbStubSource("127.0.0.1", stub.port, packets=True)
    with pytest.raises(SourceError):
        source.read(0, 0x100000)
    with pytest.raises(SourceError, match=r"^gdb://127\.0\.0\.1:\d+: .*; PhyMemMode may be left at 1 for the next "
                                          r"debugger \(reconnecting failed: gdb://127\.0\.0\.1:\d+: (cannot connect|connection lost)"):
        source.close()
    assert stub.phy_mem_mode == 1


def test_ctrl_c_mid_read_restores_phymemmode_over_the_same_connection(persistent_stub, monkeypatch):
    stub = persistent_stub(running=False)
    source = GdbStubSource("127.0.0.1", stub.port, packets=True)
    interrupt_third_parse(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        source.read(0, 0x100000)
    monkeypatch.undo()
    source.close()
    assert (stub.accepted, stub.phy_mem_mode, stub.running) == (1, 0, False)


def test_ctrl_c_while_numpy_views_the_receive_buffer(persistent_stub, monkeypatch):
    """Ctrl-C inside the block decoder: the traceback keeps numpy views of the receive buffer alive,
    and resynchronizing must still work (that buffer cannot be resized while viewed)."""
    stub = persistent_stub(running=False)
    source = GdbStubSource("127.0.0.1", stub.port, packets=True)

    def interrupted(digits):
        raise KeyboardInterrupt

    monkeypatch.setattr(binascii, "a2b_hex", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        source.read(0, 0x100000)
    monkeypatch.undo()
    assert "_parse_full_replies" in {entry.name for entry in caught.traceback}  # its frame, views and all
    source.close()
    assert (stub.accepted, stub.phy_mem_mode, stub.running) == (1, 0, False)


def test_ctrl_c_with_a_broken_connection_warns_instead_of_hiding_it(persistent_stub, monkeypatch):
    stub = persistent_stub(running=False, connections=1)
    source = GdbStubSource("127.0.0.1", stub.port, packets=True)
    monkeypatch.setattr(RspWire, "resynchronize", lambda self: (_ for _ in ()).throw(SourceError("out of step")))
    monkeypatch.setattr(PipelinedReads, "_parse_memory_replies", lambda self, *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        source.read(0, 0x100000)
    with pytest.warns(WindumpWarning, match=r"^out of step; PhyMemMode may be left at 1"):
        source.close()


def test_reading_done_leaves_qemu_as_found_and_ends_the_pause(persistent_stub):
    """Once reading is done, PhyMemMode is back and the VM that attaching stopped runs: the pause
    access() reports ends there, and no read can follow."""
    stub = persistent_stub(running=True)
    source = GdbStubSource("127.0.0.1", stub.port)
    try:
        assert source.read(0x1000, 0x1000) == bytes(0x1000)
        assert (stub.phy_mem_mode, stub.running) == (1, False)
        source.reading_done()
        assert (stub.phy_mem_mode, stub.running) == (0, True)
        access = source.access()
        # The stand-in stub runs in this process, which the same-host path never reads.
        assert (access.path, access.passed_over) == ("packets", {"procmem": "QEMU is not a process on this host (or not visible to us)"})
        assert 0 < access.paused_seconds == source.access().paused_seconds
        with pytest.raises(RuntimeError, match=r"read after reading_done\(\)"):
            source.read(0x1000, 8)
    finally:
        source.close()
    assert (stub.accepted, stub.phy_mem_mode, stub.running) == (1, 0, True)


@pytest.mark.parametrize("running, keep_stopped", [(False, False), (True, True)])
def test_a_vm_not_resumed_stays_paused(persistent_stub, running, keep_stopped):
    """A VM found paused reports no pause of windump's; with keep-stopped, one it stopped stays
    stopped and its pause counts until reading was done."""
    stub = persistent_stub(running=running)
    with GdbStubSource("127.0.0.1", stub.port, keep_stopped=keep_stopped, packets=True) as source:
        source.reading_done()
        assert (stub.phy_mem_mode, stub.running) == (0, False)
        paused = source.access().paused_seconds
        assert (paused > 0) == running and paused == source.access().paused_seconds
    assert not stub.running


def test_a_reply_that_never_ends_is_cut_off():
    """A peer streaming bytes with no ``#`` must not grow the receive buffer without bound."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        def serve():
            connection, _ = server.accept()
            with connection, contextlib.suppress(OSError):
                connection.recv(65536)
                connection.sendall(b"+" + frame(b"PacketSize=100"))
                connection.recv(65536)
                connection.sendall(b"+$")
                while True:
                    connection.sendall(b"0" * 65536)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with RemoteStub("127.0.0.1", server.getsockname()[1], timeout=5) as remote:
            limit = 2 * 0x100 * 64 + (64 << 10)
            assert remote.wire.max_reply == limit
            with pytest.raises(SourceError, match=rf"a reply ran past {limit} bytes without ending"):
                remote.command(b"qC")
            assert len(remote.wire.received) <= limit + (1 << 20)  # one receive past the limit at most
        thread.join(5)
