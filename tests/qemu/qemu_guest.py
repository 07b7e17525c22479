"""QEMU running the bare-metal test guest of ``drivers/``: its build, the machine's RAM map, the
command line, readiness, a QMP client, QEMU's own dumps of the guest and QEMU's own view of its RAM.

Everything here is deterministic on purpose: ``-icount shift=0,sleep=off`` and a VM-clock RTC make
two boots of the same image produce bit-identical dumps.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from elftools.elf.elffile import ELFFile
from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

from windump_plugins.formats.dumpheader import DUMP_HEADER64, PAGE_SHIFT
from windump_plugins.guest.boot import IMAGE_BASE

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "drivers" / "build.sh"
QEMU = "qemu-system-x86_64"
TOOLS = (QEMU, "gcc", "ld", "objcopy")

#: Lines the guest writes to the debugcon port: readiness, and a failure it diagnosed itself.
READY_LINE = b"WINDUMP-READY\n"
FAIL_MARK = b"WINDUMP-FAIL"

#: Seconds a boot may take under TCG (about 0.4 s with one vCPU, 1-3 s with four, here).
BOOT_TIMEOUT = 60

#: What makes QEMU's dumps repeatable: instruction counting without real-time sleeps, and an RTC
#: that starts at a fixed date and runs on the virtual clock.
DETERMINISM = ["-icount", "shift=0,sleep=off", "-rtc", "base=2024-01-01T00:00:00,clock=vm"]

#: The model's page tables use 1 GiB pages, which the default qemu64 CPU does not advertise.
CPU = "qemu64,+pdpe1gb"

#: Guest RAM hashed per piece of this size, so that a difference names where it is.
DIGEST_PIECE = 1 << 20

_guest_numbers = itertools.count()


class GuestError(AssertionError):
    """QEMU or the test guest did not do what a test needs; the message carries QEMU's stderr."""


def missing_tools() -> list[str]:
    """The programs the QEMU tests need that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def build_guest(outdir: Path) -> Path:
    """Build ``drivers/`` into ``outdir`` and return the multiboot ELF32 kernel."""
    result = subprocess.run(["sh", str(BUILD_SCRIPT), str(outdir)], capture_output=True, text=True)
    if result.returncode:
        raise GuestError(f"drivers/build.sh failed:\n{result.stdout}{result.stderr}")
    return outdir / "guest.elf"


def machine_args(machine: str, memory: str, cpus: int) -> list[str]:
    """The options that fix the emulated machine (shared by the RAM probe and the real boot)."""
    return ["-machine", f"{machine},accel=tcg", "-cpu", CPU, "-m", memory, "-smp", str(cpus),
            "-display", "none", "-nographic", "-no-reboot", "-net", "none", "-device", "vmcoreinfo", *DETERMINISM]


_MTREE_RAM = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ram\): (\S+)", re.M)


def parse_ram(mtree: str) -> np.ndarray:
    """The RAM of HMP ``info mtree -f``'s system address space: an ``(N, 2)`` uint64 array of
    ``[start, end)`` byte ranges, adjacent ranges merged (ROM, MMIO and VGA windows excluded)."""
    view = mtree[mtree.index('AS "memory"'):]
    view = view[:view.find("\nFlatView") if "\nFlatView" in view else len(view)]
    ranges: list[list[int]] = []
    for start, last, _name in _MTREE_RAM.findall(view):
        start, end = int(start, 16), int(last, 16) + 1
        if ranges and ranges[-1][1] == start:
            ranges[-1][1] = end
        else:
            ranges.append([start, end])
    return np.array(ranges, dtype=np.uint64).reshape(-1, 2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Machine:
    """One emulated machine configuration, as tests name it."""

    machine: str = "pc"
    memory: str = "256M"
    cpus: int = 1

    def __str__(self) -> str:
        return f"{self.machine}-{self.memory}-{self.cpus}cpu"

    @property
    def size(self) -> int:
        """The RAM size in bytes (``-m`` with an M or G suffix)."""
        return int(self.memory[:-1]) << {"M": 20, "G": 30}[self.memory[-1]]


@dataclass
class Variant:
    """A machine and the model options of one booted test guest."""

    name: str
    machine: Machine
    model: dict = field(default_factory=dict)


#: The KDBG on two physically contiguous pages (forward-mapped KERNEL_DATA).
FORWARD_VARIANT = Variant("pc-256M-2cpu-forward", Machine("pc", "256M", 2), {"forward_kernel_data": True})
#: The variants every per-guest test runs on (all 256 MiB: the session keeps them booted).
VARIANTS = [
    Variant("pc-256M-1cpu", Machine("pc", "256M", 1)),
    Variant("q35-256M-4cpu", Machine("q35", "256M", 4)),
    Variant("pc-256M-2cpu-encoded-kdbg", Machine("pc", "256M", 2), {"encoded_kdbg": True}),
    Variant("pc-256M-1cpu-bugcheck0", Machine("pc", "256M", 1), {"bugcheck_code": 0}),
    Variant("pc-256M-2cpu-keep-running", Machine("pc", "256M", 2), {"keep_running": True}),
    FORWARD_VARIANT,
]
#: RAM above 4 GiB: 1 GiB of it on pc, 2 GiB on q35 (whose low RAM stops at 2 GiB).
LARGE_VARIANTS = [Variant("pc-4G-2cpu", Machine("pc", "4G", 2)), Variant("q35-4G-2cpu", Machine("q35", "4G", 2))]


class QemuGuest:
    """One QEMU process; start it with :meth:`boot` and always :meth:`kill` it (by PID).

    With ``shared_ram`` its RAM is a shared memory-backend-file under /dev/shm (which windump's
    ``shm`` path maps), and a second QMP monitor listens on TCP at ``tcp_port``.
    """

    def __init__(self, machine: Machine, workdir: Path, kernel: Path | None = None, image: bytes | None = None,
                 *, shared_ram: bool = False):
        self.machine = machine
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = workdir / "qmp.sock"
        self.debugcon = workdir / "debugcon.log"
        self.stderr_path = workdir / "qemu.stderr"
        self.gdb_port = free_port()
        self.command = [QEMU, *machine_args(machine.machine, machine.memory, machine.cpus),
                        "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                        "-gdb", f"tcp:127.0.0.1:{self.gdb_port}", "-debugcon", f"file:{self.debugcon}"]
        self.mem_path: Path | None = None
        self.tcp_port: int | None = None
        if shared_ram:
            self.mem_path = Path(f"/dev/shm/windump-test-{os.getpid()}-{next(_guest_numbers)}")
            self.tcp_port = free_port()
            self.command += ["-object", f"memory-backend-file,id=ram,size={machine.memory},mem-path={self.mem_path},"
                             "share=on", "-machine", "memory-backend=ram",
                             "-qmp", f"tcp:127.0.0.1:{self.tcp_port},server=on,wait=off"]
        if kernel is None:
            self.command.append("-S")
        else:
            image_path = workdir / "model.img"
            image_path.write_bytes(image)
            self.command += ["-kernel", str(kernel),
                             "-device", f"loader,file={image_path},addr={IMAGE_BASE:#x},force-raw=on"]
        self.process: subprocess.Popen | None = None
        self.qmp: QEMUMonitorProtocol | None = None

    def start(self) -> None:
        """Launch QEMU and connect QMP (the guest runs unless the guest has no kernel)."""
        for stale in (self.qmp_path, self.debugcon):
            stale.unlink(missing_ok=True)
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not self._connect_qmp():
            self._check_alive("starting")
            if time.monotonic() > deadline:
                raise self.failure("QMP never accepted a connection")
            time.sleep(0.01)

    def _connect_qmp(self) -> bool:
        if not self.qmp_path.exists():
            return False
        qmp = QEMUMonitorProtocol(str(self.qmp_path))
        try:
            qmp.connect()
        except ConnectError:
            return False
        self.qmp = qmp
        return True

    def boot(self) -> QemuGuest:
        """Start QEMU and wait until the guest wrote :data:`READY_LINE` and every vCPU halted."""
        self.start()
        deadline = time.monotonic() + BOOT_TIMEOUT
        started = time.monotonic()
        while READY_LINE not in self.log():
            self._check_alive("booting")
            if FAIL_MARK in self.log():
                raise self.failure("the guest reported a failure")
            if time.monotonic() > deadline:
                raise self.failure(f"no {READY_LINE!r} within {BOOT_TIMEOUT} s")
            time.sleep(0.02)
        self.boot_seconds = time.monotonic() - started
        return self

    def wait_halted(self) -> None:
        """Wait until every vCPU sits in ``hlt``: the guest loads its registers after READY."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while self.hmp("info registers -a").count("HLT=1") < self.machine.cpus:
            if time.monotonic() > deadline:
                raise self.failure("the vCPUs never all halted")
            time.sleep(0.02)

    def log(self) -> bytes:
        return self.debugcon.read_bytes() if self.debugcon.exists() else b""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def failure(self, what: str) -> GuestError:
        return GuestError(f"QEMU {self.machine}: {what}\ncommand: {' '.join(self.command)}\n"
                          f"debugcon: {self.log()[-2000:]!r}\nstderr:\n{self.stderr()[-4000:]}")

    def _check_alive(self, doing: str) -> None:
        if self.process.poll() is not None:
            raise self.failure(f"QEMU exited with status {self.process.returncode} while {doing}")

    def execute(self, command: str, **arguments: object) -> object:
        """Run a QMP command; a QMP error fails with QEMU's message."""
        reply = self.qmp.cmd_raw(command, arguments or None)
        if "error" in reply:
            raise self.failure(f"QMP {command} {arguments}: {reply['error'].get('desc')}")
        return reply["return"]

    def hmp(self, command_line: str) -> str:
        """Run an HMP command through QMP and return its text."""
        return self.execute("human-monitor-command", **{"command-line": command_line})

    def ram(self) -> np.ndarray:
        """The machine's RAM as :func:`parse_ram` reads it from ``info mtree -f``."""
        return parse_ram(self.hmp("info mtree -f"))

    def registers(self) -> list[dict[str, int]]:
        """Every vCPU's registers from HMP ``info registers -a``, in QEMU's CPU order."""
        return [parse_registers(text) for text in re.split(r"^CPU#\d+\s*$", self.hmp("info registers -a"), flags=re.M)[1:]]

    def dump(self, path: Path, fmt: str = "win-dmp", **arguments: object) -> Path:
        """QEMU's own ``dump-guest-memory`` (physical, synchronous) into ``path``."""
        started = time.monotonic()
        self.execute("dump-guest-memory", paging=False, protocol=f"file:{path}", format=fmt, **arguments)
        self.last_dump_seconds = time.monotonic() - started
        return path

    def ram_digests(self, ram: np.ndarray) -> dict[int, str]:
        """SHA-256 of every :data:`DIGEST_PIECE` of the guest RAM ranges ``ram``, by address, as
        QEMU's own ``pmemsave`` writes them into a FIFO: no windump reader is involved."""
        fifo = self.workdir / "pmemsave.fifo"
        os.mkfifo(fifo)
        digests: dict[int, str] = {}
        try:
            for start, end in ram.tolist():
                digests.update(self._pmemsave_digests(fifo, start, end))
        finally:
            fifo.unlink()
        return digests

    def _pmemsave_digests(self, fifo: Path, start: int, end: int) -> dict[int, str]:
        """Have QEMU pmemsave [start, end) into ``fifo`` while a thread hashes what comes out."""
        digests: dict[int, str] = {}
        received = [0]

        def hash_stream() -> None:
            with open(fifo, "rb", buffering=0) as stream:
                with contextlib.suppress(OSError):  # a larger pipe only saves context switches
                    fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, DIGEST_PIECE)
                view = memoryview(bytearray(DIGEST_PIECE))
                while True:
                    filled = 0
                    while filled < len(view) and (count := stream.readinto(view[filled:])):
                        filled += count
                    if not filled:
                        return
                    digests[start + received[0]] = hashlib.sha256(view[:filled]).hexdigest()
                    received[0] += filled

        hasher = threading.Thread(target=hash_stream, daemon=True)
        hasher.start()
        try:
            self.execute("pmemsave", val=start, size=end - start, filename=str(fifo))
        except BaseException:
            while hasher.is_alive():  # QEMU may never have opened the FIFO: open and close it for EOF
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                hasher.join(0.1)
            raise
        hasher.join()
        if received[0] != end - start:
            raise self.failure(f"pmemsave of {start:#x}-{end:#x} gave {received[0]:#x} bytes")
        return digests

    def kill(self) -> None:
        """End QEMU by its PID (SIGKILL: a wedged QEMU ignores QMP ``quit``); its RAM file goes too."""
        if self.qmp is not None:
            try:
                self.qmp.close()
            except (OSError, EOFError):
                pass
            self.qmp = None
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.mem_path is not None:
            self.mem_path.unlink(missing_ok=True)


_SEGMENT = re.compile(r"^(ES|CS|SS|DS|FS|GS) =([0-9a-f]{4}) ([0-9a-f]{16})", re.M)
_REGISTER = re.compile(r"\b(R[A-Z0-9]{1,2}|RIP|RFL|CR[0-4]|DR[0-7]|EFER|MXCSR)\s?=([0-9a-f]+)")
_XMM = re.compile(r"\bXMM(\d\d)=([0-9a-f]{16}) ([0-9a-f]{16})")


def parse_registers(text: str) -> dict[str, int]:
    """One CPU's ``info registers`` text as :class:`windump_plugins.source.CpuState` names."""
    registers = {name.lower(): int(value, 16) for name, value in _REGISTER.findall(text)}
    registers["rflags"] = registers.pop("rfl")
    for name, selector, base in _SEGMENT.findall(text):
        registers[name.lower()] = int(selector, 16)
        if name in ("FS", "GS"):
            registers[f"{name.lower()}_base"] = int(base, 16)
    for number, high, low in _XMM.findall(text):
        registers[f"xmm{int(number)}"] = int(high + low, 16)
    registers["halted"] = int("HLT=1" in text)
    return registers


def dump_header(path: Path) -> np.ndarray:
    """The DUMP_HEADER64 (0-d) at the start of a Windows dump file."""
    with open(path, "rb") as dump:
        return np.frombuffer(dump.read(DUMP_HEADER64.itemsize), dtype=DUMP_HEADER64).reshape(())


def dump_runs(header: np.ndarray) -> np.ndarray:
    """``(N, 3)`` uint64 rows of [first physical byte, end byte, file offset] of a full dump's runs."""
    block = header["PhysicalMemoryBlock"]
    runs = block["Run"][:int(block["NumberOfRuns"])]
    base = runs["BasePage"].astype(np.uint64) << np.uint64(PAGE_SHIFT)
    size = runs["PageCount"].astype(np.uint64) << np.uint64(PAGE_SHIFT)
    offsets = np.uint64(DUMP_HEADER64.itemsize) + np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.uint64)
    return np.stack([base, base + size, offsets], axis=1)


def read_dump_physical(path: Path, address: int, length: int) -> bytes:
    """Guest physical bytes as a full dump holds them (the range must lie in one run)."""
    for start, end, offset in dump_runs(dump_header(path)).tolist():
        if start <= address and address + length <= end:
            with open(path, "rb") as dump:
                dump.seek(offset + address - start)
                return dump.read(length)
    raise GuestError(f"{path}: physical range {address:#x}+{length:#x} is in no run of the dump")


def elf_notes(path: Path) -> list[tuple[str, int, bytes]]:
    """Every ELF note of a QEMU ``dump-guest-memory`` ELF as (name, type, descriptor bytes)."""
    with open(path, "rb") as stream:
        elf = ELFFile(stream)
        notes = []
        for segment in elf.iter_segments("PT_NOTE"):
            data, at = segment.data(), 0
            while at + 12 <= len(data):
                namesz, descsz, kind = struct.unpack_from("<III", data, at)
                name_end = at + 12 + namesz
                desc_at = at + 12 + (namesz + 3 & ~3)
                notes.append((data[at + 12:name_end].rstrip(b"\0").decode(), kind, data[desc_at:desc_at + descsz]))
                at = desc_at + (descsz + 3 & ~3)
        return notes


def elf_note_bytes(path: Path) -> bytes:
    """The raw PT_NOTE contents of a QEMU ELF dump."""
    with open(path, "rb") as stream:
        return b"".join(segment.data() for segment in ELFFile(stream).iter_segments("PT_NOTE"))


def elf_loads(path: Path) -> np.ndarray:
    """``(N, 2)`` uint64 [start, end) guest-physical ranges of a QEMU ELF dump's PT_LOADs."""
    with open(path, "rb") as stream:
        loads = [(s["p_paddr"], s["p_paddr"] + s["p_memsz"]) for s in ELFFile(stream).iter_segments("PT_LOAD")]
    return np.array(loads, dtype=np.uint64).reshape(-1, 2)


def read_elf_physical(path: Path, address: int, length: int) -> bytes:
    """Guest physical bytes from a QEMU ELF dump (the range must lie in one PT_LOAD)."""
    with open(path, "rb") as stream:
        for segment in ELFFile(stream).iter_segments("PT_LOAD"):
            start = segment["p_paddr"]
            if start <= address and address + length <= start + segment["p_filesz"]:
                stream.seek(segment["p_offset"] + address - start)
                return stream.read(length)
    raise GuestError(f"{path}: physical range {address:#x}+{length:#x} is in no PT_LOAD")
