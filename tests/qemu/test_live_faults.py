"""Faults against a live QEMU: QEMU killed mid-dump and Ctrl-C mid-dump, through the gdbstub and
QMP sources. Each ends in one clear line with no file left, and a guest that survives is left as
it was found: PhyMemMode 0 (seen through a fresh gdbstub connection) and its run state (QMP)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from dumpfiles import stop_midway
import pytest
from corpus import BUILT_IN_PLUGINS
from qemu_guest import VARIANTS

from windump_plugins.live.rsp import RemoteStub

pytestmark = pytest.mark.qemu

VARIANT = {variant.name: variant for variant in VARIANTS}
HALTED = VARIANT["pc-256M-1cpu"]
RUNNING = VARIANT["pc-256M-2cpu-keep-running"]


def start_save(source: str, cwd: Path) -> subprocess.Popen:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("WINDUMP_")}
    environ["WINDUMP_PLUGINS"] = BUILT_IN_PLUGINS
    return subprocess.Popen([sys.executable, "-m", "windump_plugins", "save", "-q", source, "guest.dmp"], cwd=cwd,
                            env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def phy_mem_mode(port: int) -> int:
    with RemoteStub("127.0.0.1", port) as stub:
        return stub.phy_mem_mode()


@pytest.fixture
def workdir(tmp_path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def test_qemu_killed_mid_dump_over_the_gdbstub(boot_guest, workdir):
    guest = boot_guest(HALTED)
    process = start_save(f"gdb://127.0.0.1:{guest.qemu.gdb_port}?packets", workdir)
    stop_midway(process, workdir, 8 << 20)
    guest.qemu.kill()
    os.kill(process.pid, signal.SIGCONT)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith(f"windump: error: gdb://127.0.0.1:{guest.qemu.gdb_port}: ")
    assert "closed the connection" in err or "connection lost" in err
    assert os.listdir(workdir) == []


def test_ctrl_c_mid_dump_over_the_gdbstub_restores_phymemmode(booted_once, workdir):
    guest = booted_once(HALTED)
    assert guest.qemu.execute("query-status")["running"] is False
    process = start_save(f"gdb://127.0.0.1:{guest.qemu.gdb_port}?packets", workdir)
    stop_midway(process, workdir, 8 << 20)
    os.kill(process.pid, signal.SIGINT)
    os.kill(process.pid, signal.SIGCONT)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out, err) == (130, "", "windump: interrupted\n")
    assert os.listdir(workdir) == []
    assert phy_mem_mode(guest.qemu.gdb_port) == 0
    assert guest.qemu.execute("query-status")["running"] is False


def test_qemu_killed_mid_dump_over_qmp(boot_guest, workdir):
    guest = boot_guest(HALTED)
    guest.qemu.qmp.close()
    guest.qemu.qmp = None
    process = start_save(f"qmp:{guest.qemu.qmp_path}?memory=procmem", workdir)
    stop_midway(process, workdir, 0x2000)
    guest.qemu.kill()
    os.kill(process.pid, signal.SIGCONT)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out) == (1, "")
    assert err == f"windump: error: qmp:{guest.qemu.qmp_path}: QEMU (process {guest.qemu.process.pid}) quit while its RAM was being read\n"
    assert os.listdir(workdir) == []


def test_ctrl_c_mid_dump_over_qmp_resumes_the_guest(boot_guest, workdir):
    guest = boot_guest(RUNNING)
    assert guest.qemu.execute("query-status")["running"] is True
    guest.qemu.qmp.close()
    guest.qemu.qmp = None
    process = start_save(f"qmp:{guest.qemu.qmp_path}?memory=stream", workdir)
    stop_midway(process, workdir, 0x2000)
    os.kill(process.pid, signal.SIGINT)
    os.kill(process.pid, signal.SIGCONT)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out, err) == (130, "", "windump: interrupted\n")
    assert os.listdir(workdir) == []
    assert guest.qemu._connect_qmp()
    assert guest.qemu.execute("query-status")["running"] is True
    assert guest.qemu.execute("query-dump")["status"] != "active"
    assert phy_mem_mode(guest.qemu.gdb_port) == 0
