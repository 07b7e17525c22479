"""Faults while ``windump save`` runs: the disk fills midway, the output file system is read-only,
Ctrl-C arrives while the source opens or while the body is written. Each ends in one clear line,
no output and no temporary file."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import dumpfiles
import pytest

from corpus import BUILT_IN_PLUGINS
from gate import unavailable
from corpus.files import model_elf_with

#: Bytes of a sample guest with this much RAM: large enough that its body takes a while to write.
LARGE_SAMPLE = "sample:ram=3G"


def windump(*args: str, cwd: Path) -> subprocess.Popen:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("WINDUMP_")}
    environ["WINDUMP_PLUGINS"] = BUILT_IN_PLUGINS
    return subprocess.Popen([sys.executable, "-m", "windump_plugins", *args], cwd=cwd, env=environ,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (skips when mounting is not allowed here)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "windump-test", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        unavailable(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def model_elf(tmp_path) -> Path:
    path = tmp_path / "guest.elf"
    model_elf_with(lambda header: None)(path)
    return path


def finished(process: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.mark.parametrize("options, reason", [("size=4m", r"the dump needs \d+ bytes, its file system has 4194304 free"),
                                             ("size=64m,ro", "Read-only file system")])
def test_disk_full_or_read_only_output(tmp_path, model_elf, options, reason):
    with tmpfs(tmp_path / "out", options) as out:
        status, stdout, stderr = finished(windump("save", "-q", str(model_elf), "out/guest.dmp", cwd=tmp_path))
        assert (status, stdout) == (1, "")
        assert re.fullmatch(rf"windump: error: cannot write out/guest\.dmp: {reason}\n", stderr)
        assert os.listdir(out) == []


def test_a_fifo_nobody_writes_as_source_is_refused_without_waiting(tmp_path):
    """Opening a FIFO with no writer used to block until Ctrl-C; now it is refused unread."""
    fifo = tmp_path / "guest.elf"
    os.mkfifo(fifo)
    status, stdout, stderr = finished(windump("save", "guest.elf", "guest.dmp", cwd=tmp_path))
    assert (status, stdout) == (1, "")
    assert stderr == ("windump: error: guest.elf is a FIFO (named pipe), not a file: expected a QEMU ELF dump "
                      "file or SCHEME:...\n")
    assert sorted(os.listdir(tmp_path)) == ["guest.elf"]


def test_ctrl_c_while_the_body_is_written(tmp_path):
    """Stopped (SIGSTOP) once its dump file holds part of the body, interrupted, resumed."""
    process = windump("save", LARGE_SAMPLE, "guest.dmp", cwd=tmp_path)
    size = dumpfiles.stop_midway(process, tmp_path, 64 << 20)
    os.kill(process.pid, signal.SIGINT)
    os.kill(process.pid, signal.SIGCONT)
    status, stdout, stderr = finished(process)
    assert size < 0x2000 + (3 << 30), "interrupted too late to be midway"
    assert (status, stdout) == (130, "")
    assert stderr.endswith("windump: interrupted\n")
    assert "Traceback" not in stderr and "error" not in stderr
    assert os.listdir(tmp_path) == []
