"""gdb's ``set windump ...`` settings under the gdb:// options' names, ``-v`` in gdb, and the help
gdb shows, in a real gdb attached to the halted test guest."""

from __future__ import annotations

import re

import pytest
from test_gdb_command import AFTERWARDS, check_left_clean, error_lines, gdb, halted  # noqa: F401 (a fixture)

from windump_plugins.frontends.gdb import save_help

pytestmark = pytest.mark.qemu


def test_settings_stand_in_for_the_flags_and_verbose_logs(halted, tmp_path):
    """``set windump packets on`` reads through packets as ``--packets`` does, and the summary says
    so with why procmem was passed over; ``set windump verbose on`` logs the phases."""
    ours = tmp_path / "set.dmp"
    result = gdb(halted.qemu.gdb_port, "set windump packets on", "set windump verbose on", "show windump packets",
                 f"windump-save {ours}", *AFTERWARDS)
    assert ours.exists(), result.stdout + result.stderr
    assert "read RAM with the stub's m packets even when QEMU's process memory can be read is on." in result.stdout
    summary = next(line for line in result.stdout.splitlines() if line.startswith("windump-save: wrote"))
    assert re.search(r", from packets \(passed over procmem: .+\); header context: vCPU 0$", summary), summary
    access = summary.split(", from ", 1)[1].removesuffix("; header context: vCPU 0")
    assert f"windump-save: info: {ours}: read from {access}\n" in result.stdout  # -v says it too
    assert re.search(rf"^windump-save: info: {re.escape(str(ours))}: header \d+\.\d\d s, body \d+\.\d\d s "
                     r"\(\d+ MB/s\), sync \d+\.\d\d s$", result.stdout, re.M), result.stdout
    check_left_clean(result)
    flag = gdb(halted.qemu.gdb_port, "set windump packets on", f"windump-save --force --quiet {ours}")
    assert "windump-save: info:" not in flag.stdout and "windump-save: wrote" not in flag.stdout
    assert error_lines(flag) == []


def test_help_is_the_parsers_and_usage_errors_are_one_line(tmp_path):
    shown = gdb(None, "help windump-save", "windump-save --timeout soon x.dmp")
    assert save_help() in shown.stdout
    assert error_lines(shown) == [
        "windump-save: argument --timeout: bad option value timeout='soon': expected a number of seconds above 0, "
        "such as 2.5 (usage: windump-save [-f] [--header-pa ADDR] [--packets] [--timeout S] [-q] [-v] FILE)"]
