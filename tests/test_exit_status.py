"""Exit statuses of ``windump save``: once the dump is in place, nothing that happens to stdout (a
full device, a closed pipe, a file name its encoding cannot show, a terminal that hung up) turns
success into failure; and a bad ``timeout=`` is a one-line error before anything is opened."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pausing import Save, install_plugin

from corpus import BUILT_IN_PLUGINS
from windump_plugins.frontends import gdb as gdb_frontend
from windump_plugins.verify import verify_dump


def save(*args: str | bytes, cwd: Path, env: dict[str, str] | None = None, **popen) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("WINDUMP_")}
    environ.update(WINDUMP_PLUGINS=BUILT_IN_PLUGINS, **(env or {}))
    popen.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "windump_plugins", "save", *args], cwd=cwd, env=environ,
                          stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120, **popen)


def summary_warning(output: str, reason: str) -> bytes:
    return f"windump: warning: {output} is written, but its summary could not be printed: {reason}\n".encode()


@pytest.mark.parametrize("json", [False, True], ids=["summary", "json"])
def test_stdout_on_a_full_device(tmp_path, json):
    with open("/dev/full", "wb") as full:
        result = save(*(["--json"] if json else []), "sample:", "guest.dmp", cwd=tmp_path, stdout=full)
    assert (result.returncode, result.stderr) == (0, summary_warning("guest.dmp", "No space left on device"))
    assert verify_dump(tmp_path / "guest.dmp") == []


def test_stdout_a_pipe_nobody_reads(tmp_path):
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = save("sample:", "guest.dmp", cwd=tmp_path, stdout=writer)
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr) == (0, summary_warning("guest.dmp", "Broken pipe"))
    assert verify_dump(tmp_path / "guest.dmp") == []


@pytest.mark.parametrize("encoding", ["utf-8:strict", "ascii:strict"])
def test_output_name_that_is_not_text(tmp_path, encoding):
    """A name with a byte that is not UTF-8: the summary shows it as the bytes it is on disk."""
    result = save("sample:", b"guest-\xff.dmp", cwd=tmp_path, env={"PYTHONIOENCODING": encoding})
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.startswith(b"wrote guest-\xff.dmp: ")
    assert os.listdir(os.fsencode(tmp_path)) == [b"guest-\xff.dmp"]


@pytest.mark.parametrize("closed", [1, 2, (1, 2)], ids=["stdout", "stderr", "both"])
def test_started_with_stdout_or_stderr_closed(tmp_path, closed):
    """``windump save ... >&-``: Python then has no sys.stdout (or sys.stderr); the dump is still
    written and the status is 0, and nothing is written to a descriptor the dump may have taken."""
    closing = closed if isinstance(closed, tuple) else (closed,)
    result = save("sample:", "guest.dmp", cwd=tmp_path, preexec_fn=lambda: [os.close(fd) for fd in closing])
    assert result.returncode == 0
    assert result.stderr == (b"" if 2 in closing else summary_warning("guest.dmp", "stdout is closed"))
    assert result.stdout.startswith(b"" if 1 in closing else b"wrote guest.dmp: ")
    assert verify_dump(tmp_path / "guest.dmp") == []


def _controlling_terminal(slave: str):
    def become() -> None:  # in the child, after setsid: opening the terminal makes it ours
        os.close(os.open(slave, os.O_RDWR))
    return become


def test_the_terminal_hangs_up_once_the_dump_is_in_place(tmp_path):
    """The terminal windump runs in closes while the source is closing, after the dump was
    installed: the kernel sends SIGHUP and every write to the terminal fails. Still exit 0."""
    site, out = install_plugin(tmp_path / "site"), tmp_path / "out"
    out.mkdir()
    master, slave = pty.openpty()
    try:
        run = Save(site, out, "pausing:close", "guest.dmp", stdout=slave, stderr=slave, start_new_session=True,
                   preexec_fn=_controlling_terminal(os.ttyname(slave)))
    finally:
        os.close(slave)
    run.wait_for("closing")
    os.close(master)  # the hangup: SIGHUP to windump, which leads the terminal's session
    run.go()
    status, _, _ = run.finish()
    assert status == 0
    assert run.seen[-2:] == ["closing", "closed"]
    assert os.listdir(out) == ["guest.dmp"] and verify_dump(out / "guest.dmp") == []


def test_the_terminal_hangs_up_midway(tmp_path):
    """The same hangup mid-body: the save stops there, cleanly, with 129."""
    site, out = install_plugin(tmp_path / "site"), tmp_path / "out"
    out.mkdir()
    master, slave = pty.openpty()
    try:
        run = Save(site, out, "pausing:body", "guest.dmp", stdout=slave, stderr=slave, start_new_session=True,
                   preexec_fn=_controlling_terminal(os.ttyname(slave)))
    finally:
        os.close(slave)
    run.wait_for("body")
    os.close(master)
    status, _, _ = run.finish()
    assert status == 128 + signal.SIGHUP
    assert run.seen[-2:] == ["closing", "closed"]
    assert os.listdir(out) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
@pytest.mark.parametrize("location", ["gdb://127.0.0.1:1?timeout={}", "qmp://127.0.0.1:1?timeout={}"])
def test_a_timeout_that_is_not_a_finite_positive_number(tmp_path, location, value):
    result = save(location.format(value), "guest.dmp", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr.decode() == (f"windump: error: {location.format(value)}: bad option value timeout={value!r}: "
                                      "expected a number of seconds above 0, such as 2.5\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_windump_save_timeout_in_gdb_is_checked_alike(value):
    with pytest.raises(gdb_frontend.WindumpError, match=rf"^argument --timeout: bad option value timeout='{value}': "
                                                        r"expected a number of seconds above 0, such as 2\.5 \(usage: "):
        gdb_frontend.save_parser().parse_args(["--timeout", value, "guest.dmp"])
