"""SIGTERM, SIGHUP and SIGQUIT against a live QEMU, as Ctrl-C is tested in test_live_faults: mid-body
through ``windump save gdb://`` and ``qmp:``, and in gdb's ``windump-save``. Each ends in one line
and 128 + N (the command line), no file, PhyMemMode 0 and the guest's run state as found.

Each signal is sent at a phase the test sees: the command line is stopped (SIGSTOP) once its
temporary dump has grown, signalled, then continued; inside gdb, a hook sends it from a read."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from test_gdb_command import AFTERWARDS, HALTED, check_left_clean, error_lines, gdb
from dumpfiles import stop_midway
from test_live_faults import RUNNING, phy_mem_mode, start_save


pytestmark = pytest.mark.qemu

SIGNALS = [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]


def signal_midway(process: subprocess.Popen, directory: Path, signum: int, size: int) -> tuple[int, str, str]:
    stop_midway(process, directory, size)
    os.kill(process.pid, signum)
    os.kill(process.pid, signal.SIGCONT)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


@pytest.fixture
def workdir(tmp_path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


@pytest.fixture
def running_without_qmp(booted_once):
    """The running guest with the test bed's QMP connection closed, so windump can take QMP;
    connected again afterwards for the tests that share the guest."""
    guest = booted_once(RUNNING)
    guest.qemu.qmp.close()
    guest.qemu.qmp = None
    yield guest
    assert guest.qemu._connect_qmp(), "QEMU's QMP socket no longer accepts connections"


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda signum: signum.name)
def test_signal_mid_dump_over_the_gdbstub_restores_phymemmode(booted_once, workdir, signum):
    guest = booted_once(HALTED)
    assert guest.qemu.execute("query-status")["running"] is False
    process = start_save(f"gdb://127.0.0.1:{guest.qemu.gdb_port}?packets", workdir)
    status, out, err = signal_midway(process, workdir, signum, 8 << 20)
    assert (status, out, err) == (128 + signum, "", f"windump: interrupted by {signum.name}\n")
    assert os.listdir(workdir) == []
    assert phy_mem_mode(guest.qemu.gdb_port) == 0
    assert guest.qemu.execute("query-status")["running"] is False


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda signum: signum.name)
@pytest.mark.parametrize("memory", ["stream", "procmem"])
def test_signal_mid_dump_over_qmp_resumes_the_guest(running_without_qmp, workdir, memory, signum):
    process = start_save(f"qmp:{running_without_qmp.qemu.qmp_path}?memory={memory}", workdir)
    status, out, err = signal_midway(process, workdir, signum, 0x2000)
    assert (status, out, err) == (128 + signum, "", f"windump: interrupted by {signum.name}\n")
    assert os.listdir(workdir) == []
    assert running_without_qmp.qemu._connect_qmp()
    try:
        assert running_without_qmp.qemu.execute("query-status")["running"] is True
    finally:
        running_without_qmp.qemu.qmp.close()
        running_without_qmp.qemu.qmp = None


@pytest.fixture
def halted(booted_once):
    guest = booted_once(HALTED)
    yield guest
    guest.qemu.execute("stop")


def hook(tmp_path: Path, module: str, method: str, signum: int, call: int) -> Path:
    """A gdb script that makes ``module``'s ``Class.method`` send ``signum`` to gdb on its ``call``-th call."""
    script = tmp_path / "signal.py"
    script.write_text(f"import os\nfrom {module} import {method.split('.')[0]} as c\nr = c.{method.split('.')[1]}\n"
                      "n = [0]\n"
                      "def hooked(self, *a):\n"
                      "    n[0] += 1\n"
                      f"    if n[0] == {call}: os.kill(os.getpid(), {int(signum)})\n"
                      "    return r(self, *a)\n"
                      f"c.{method.split('.')[1]} = hooked\n")
    return script


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda signum: signum.name)
def test_signal_in_gdb_mid_dump(halted, tmp_path, signum):
    """windump-save takes SIGTERM, SIGHUP and SIGQUIT from gdb while it runs: interrupted there as
    by Ctrl-C, PhyMemMode restored, and gdb gets the signal back afterwards."""
    script = hook(tmp_path, "windump_plugins.frontends.gdb", "GdbConnection.readinto", signum, 6)
    result = gdb(halted.qemu.gdb_port, f"source {script}", f"windump-save --packets {tmp_path}/x.dmp",
                 *AFTERWARDS, cwd=tmp_path)
    assert error_lines(result) == [f"windump-save: interrupted by {signum.name}: no dump written, PhyMemMode restored"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["signal.py"]
    check_gdb_after(result, signum, halted.qemu.gdb_port)


def check_gdb_after(result: subprocess.CompletedProcess, signum: int, port: int) -> None:
    """gdb answered the signal given back as gdb does: SIGTERM ends gdb at its next command (which
    detaches from the stub); in -batch a hangup or SIGQUIT lets the commands go on. PhyMemMode is 0."""
    if signum == signal.SIGTERM:
        assert result.stdout.endswith("[Inferior 1 (process 1) detached]\n"), result.stdout
        assert "rip " not in result.stdout  # the last command never ran
        assert phy_mem_mode(port) == 0
    else:
        check_left_clean(result)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda signum: signum.name)
def test_signal_in_gdb_once_the_dump_is_written(halted, tmp_path, signum):
    """The signal arrives while the source closes after the dump was installed: windump-save
    finishes and prints its summary; gdb then answers the signal itself."""
    script = hook(tmp_path, "windump_plugins.sources.gdbstub", "GdbStubSource.close", signum, 1)
    result = gdb(halted.qemu.gdb_port, f"source {script}", f"windump-save --packets {tmp_path}/x.dmp",
                 *AFTERWARDS, cwd=tmp_path)
    assert error_lines(result) == [], result.stderr
    assert "windump-save: wrote " in result.stdout, result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["signal.py", "x.dmp"]
    check_gdb_after(result, signum, halted.qemu.gdb_port)
