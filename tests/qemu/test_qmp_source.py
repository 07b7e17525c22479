"""The ``qmp:`` source against the QEMU test bed: a TCP monitor on this host reaches every memory path,
a running guest is paused only while its RAM is read, and faults end in one line with the VM as it
was (test_live_paths compares each memory path's dump with QEMU's win-dmp)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from qemu_guest import (
    QEMU,
    VARIANTS,
    Machine,
    QemuGuest,
    Variant,
    machine_args,
)
from readers import PAGE_SIZE, kdmp_read, volatility_read

from windump_plugins.errors import SourceError, WindumpError
from windump_plugins.guest.model import IMAGE_BASE
from windump_plugins.save import save
from windump_plugins.sources.qmp import QmpSource

pytestmark = pytest.mark.qemu

VARIANT = {variant.name: variant for variant in VARIANTS}
HALTED = VARIANT["pc-256M-1cpu"]
RUNNING = VARIANT["pc-256M-2cpu-keep-running"]


@contextlib.contextmanager
def qmp_released(qemu: QemuGuest):
    """Free QEMU's single QMP connection for the source under test, and take it back after."""
    qemu.qmp.close()
    qemu.qmp = None
    try:
        yield str(qemu.qmp_path)
    finally:
        assert qemu._connect_qmp(), "QMP did not accept the test harness again"


def check_readers(dump: Path, model) -> None:
    """kdmp-parser and volatility3 parse the dump and see the model's bytes at a few pages."""
    pages = [IMAGE_BASE, IMAGE_BASE + PAGE_SIZE, int(model.ram[-1][1]) - PAGE_SIZE]
    for result in (kdmp_read(dump, pages), volatility_read(dump, pages)):
        assert result.parsed, f"{result.reader}: {result.reason}"
        for page in pages:
            assert result.physical[page] == model.read(page, PAGE_SIZE), f"{result.reader}: page {page:#x}"


@pytest.mark.parametrize("memory", ["shm", "procmem", "stream"])
@pytest.mark.parametrize("booted", [HALTED], indirect=True, ids=lambda v: v.name)
def test_tcp_monitor_on_this_host(booted, memory, tmp_path):
    """qmp://127.0.0.1:PORT finds the local QEMU's PID and, with no fd passing over TCP, has QEMU
    write its ELFs into a FIFO; every memory path gives QEMU's win-dmp outside the difference table."""
    from difftable import assert_same_outside_differences

    qemu, model = booted.qemu, booted.model
    qemu_dmp, _ = booted.win_dmp()
    ours = tmp_path / "tcp.dmp"
    with QmpSource(("127.0.0.1", qemu.tcp_port), memory=memory) as source:
        save(source, ours)
    assert source.qemu_pid == qemu.process.pid
    assert_same_outside_differences(ours, qemu_dmp)
    check_readers(ours, model)


@pytest.mark.parametrize("memory", ["procmem", "stream"])
@pytest.mark.parametrize("booted", [RUNNING], indirect=True, ids=lambda v: v.name)
def test_running_guest_paused_only_while_read(booted, memory, tmp_path):
    """A running guest is stopped for the read, runs again afterwards, and the readers accept the dump."""
    qemu = booted.qemu
    qemu.execute("cont")
    seen_running: list[bool] = []
    ours = tmp_path / f"{memory}.dmp"
    with qmp_released(qemu) as socket_path:
        with QmpSource(socket_path, memory=memory) as source:
            save(source, ours, progress=lambda done, total: seen_running.append(source.execute("query-status")["running"]))
            assert source.execute("query-status")["running"] is True  # resumed by reading_done, before close
    assert seen_running and not any(seen_running)
    assert source.qmp.was_running and 0 < source.access().paused_seconds < 60
    assert qemu.execute("query-status")["running"] is True
    qemu.execute("stop")
    check_readers(ours, booted.model)


@pytest.mark.parametrize("booted", [RUNNING], indirect=True, ids=lambda v: v.name)
def test_error_midway_resumes_guest(booted, tmp_path):
    """A failure while the dump is written still resumes the running guest and leaves no file."""
    qemu = booted.qemu
    qemu.execute("cont")

    def fail(done: int, total: int) -> None:
        if done > 0x2000:
            raise KeyboardInterrupt

    with qmp_released(qemu) as socket_path:
        with pytest.raises(KeyboardInterrupt):
            with QmpSource(socket_path, memory="stream") as source:
                save(source, tmp_path / "never.dmp", progress=fail)
    assert not list(tmp_path.iterdir())
    assert qemu.execute("query-status")["running"] is True
    assert qemu.execute("query-dump")["status"] in ("failed", "completed")
    qemu.execute("stop")


def test_missing_socket(tmp_path):
    with pytest.raises(SourceError, match="no socket at .*-qmp unix:"):
        QmpSource(str(tmp_path / "absent.sock"))


def test_peer_that_is_not_qemu(tmp_path):
    """A unix socket whose server greets with something else, or says nothing, is refused."""
    path = str(tmp_path / "other.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()

        def serve(greeting: bytes) -> None:
            connection, _ = server.accept()
            with connection:
                connection.sendall(greeting)
                time.sleep(1.0)

        for greeting, message in ((b"SSH-2.0-OpenSSH\r\n", "not a QEMU QMP monitor"), (b"", "sent no QMP greeting")):
            thread = threading.Thread(target=serve, args=(greeting,))
            thread.start()
            try:
                with pytest.raises(SourceError, match=message):
                    QmpSource(path, timeout=0.5)
            finally:
                thread.join()


def test_no_vmcoreinfo_device(tmp_path):
    """A QEMU without -device vmcoreinfo is named as the cause, with the fix."""
    socket_path = tmp_path / "qmp.sock"
    args = [arg for arg in machine_args("pc", "64M", 1) if arg not in ("-device", "vmcoreinfo")]
    process = subprocess.Popen([QEMU, *args, "-S", "-qmp", f"unix:{socket_path},server=on,wait=off"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the socket file appears at bind(), before QEMU listens
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(socket_path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    time.sleep(0.01)
        with pytest.raises(SourceError, match="no vmcoreinfo device.*-device vmcoreinfo"):
            QmpSource(str(socket_path))
    finally:
        process.kill()
        process.wait()


def test_guest_without_note(tmp_path):
    """With the device but a guest that published nothing, the message points at the guest driver."""
    qemu = QemuGuest(Machine("pc", "64M", 1), tmp_path)
    try:
        qemu.start()
        with qmp_released(qemu) as socket_path, pytest.raises(SourceError, match="no VMCOREINFO note.*fwcfg"):
            QmpSource(socket_path)
    finally:
        qemu.kill()


@pytest.mark.parametrize("booted", [HALTED], indirect=True, ids=lambda v: v.name)
def test_dump_already_in_progress(booted, tmp_path):
    """A dump QEMU is still writing (here stuck on a full FIFO) is reported, and the guest untouched."""
    qemu = booted.qemu
    fifo = tmp_path / "stuck.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        qemu.execute("dump-guest-memory", paging=False, protocol=f"file:{fifo}", detach=True, format="elf")
        with qmp_released(qemu) as socket_path, pytest.raises(SourceError, match="already writing a dump"):
            QmpSource(socket_path)
    finally:
        os.set_blocking(reader, True)
        while os.read(reader, 1 << 20):
            pass
        os.close(reader)
    while qemu.execute("query-dump")["status"] == "active":
        time.sleep(0.01)
    assert qemu.execute("query-status")["running"] is False


def test_qemu_quits_mid_dump(boot_guest, tmp_path):
    """QEMU killed while its RAM streams: one SourceError line, and no output file."""
    guest = boot_guest(Variant("pc-256M-1cpu-doomed", Machine("pc", "256M", 1)))

    def kill(done: int, total: int) -> None:
        if done > 0x2000:
            guest.qemu.process.kill()

    guest.qemu.qmp.close()
    guest.qemu.qmp = None
    with pytest.raises(WindumpError, match="did QEMU quit"):
        with QmpSource(str(guest.qemu.qmp_path), memory="stream") as source:
            save(source, tmp_path / "never.dmp", progress=kill)
    assert not (tmp_path / "never.dmp").exists()


@pytest.mark.parametrize("booted", [RUNNING], indirect=True, ids=lambda v: v.name)
def test_command_line_dumps_a_running_guest(booted, run_windump, tmp_path):
    """`windump save qmp:SOCKET OUT` as a user types it: the qmp plugin loads through its entry
    point, the summary reports the pause, the dump verifies and the guest runs on."""
    qemu = booted.qemu
    qemu.execute("cont")
    with qmp_released(qemu) as socket_path:
        result = run_windump("save", f"qmp:{socket_path}", "live.dmp")
    assert result.returncode == 0, result.stderr
    assert "guest paused" in result.stdout
    assert qemu.execute("query-status")["running"] is True
    qemu.execute("stop")
    verified = run_windump("verify", "live.dmp")
    assert verified.stdout.strip() == "live.dmp: ok", verified.stdout + verified.stderr


@pytest.mark.parametrize("booted", [RUNNING], indirect=True, ids=lambda v: v.name)
def test_qmp_at_a_gdbstub_port_names_it_and_leaves_the_vm_as_found(booted):
    """qmp://HOST:GDBPORT: QEMU's gdbstub stops a running VM on accepting us and says so, so windump
    names it and detaches (the VM runs again); a stopped VM's stub is silent, and stays stopped."""
    qemu = booted.qemu
    where = f"127.0.0.1:{qemu.gdb_port}"
    qemu.execute("cont")
    try:
        with pytest.raises(SourceError, match=rf"answers like a gdbstub .*: this looks like a gdbstub; use gdb://{where}$"):
            QmpSource(("127.0.0.1", qemu.gdb_port), timeout=2)
        deadline = time.monotonic() + 5
        while not qemu.execute("query-status")["running"] and time.monotonic() < deadline:
            time.sleep(0.05)  # QEMU handles the detach after windump has closed
        assert qemu.execute("query-status")["running"] is True
    finally:
        qemu.execute("stop")
    with pytest.raises(SourceError, match=rf"{where} accepted the connection but sent nothing within 0.5 s"):
        QmpSource(("127.0.0.1", qemu.gdb_port), timeout=0.5)
    assert qemu.execute("query-status")["running"] is False


@pytest.mark.parametrize("booted", [HALTED], indirect=True, ids=lambda v: v.name)
def test_tcp_monitor_held_by_another_client(booted):
    """QEMU serves one client per QMP monitor: the second waits unaccepted, and is told why."""
    qemu = booted.qemu
    with QmpSource(("127.0.0.1", qemu.tcp_port)):
        with pytest.raises(SourceError, match=r"QEMU has not accepted the connection to .* within 0.5 s: another "
                                              r"client may hold the monitor"):
            QmpSource(("127.0.0.1", qemu.tcp_port), timeout=0.5)
