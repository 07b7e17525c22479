"""Signals during ``windump save``: SIGINT, SIGTERM, SIGHUP and SIGQUIT each take the path Ctrl-C
takes, at every phase of a save, with the exit status 128 + N, no file left beside the output and
the source closed (a live guest put back); a second signal never cuts that short, and a signal once
the dump is in place changes nothing.

Each signal is sent at a phase the test sees (the pausing source reports it and waits), never after
a guessed sleep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import dumpfiles
import pytest
from pausing import Save, install_plugin

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]


def interrupted(signum: int) -> str:
    return "windump: interrupted\n" if signum == signal.SIGINT else f"windump: interrupted by {signum.name}\n"


@pytest.fixture
def site(tmp_path) -> Path:
    return install_plugin(tmp_path / "site")


@pytest.fixture
def out(tmp_path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


@pytest.mark.parametrize("phase", ["open", "header", "body"])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda signum: signum.name)
def test_each_signal_at_each_phase_ends_clean(site, out, signum, phase):
    save = Save(site, out, f"pausing:{phase}", "guest.dmp")
    save.wait_for(phase)
    if phase == "body":
        assert dumpfiles.writing(save.process.pid, out), "the body phase begins once the dump file exists"
    save.signal(signum)
    status, stdout, stderr = save.finish()
    assert (status, stdout, stderr) == (128 + signum, "", interrupted(signum))
    assert os.listdir(out) == []
    # A source that was opened is closed (a live one resumes its guest there); none was while opening.
    assert save.seen[-2:] == (["open"] if phase == "open" else ["closing", "closed"])


def test_a_second_signal_does_not_cut_the_cleanup_short(site, out):
    """SIGINT mid-body, then SIGTERM and SIGHUP while the source is being closed: the close
    finishes, and the exit status is the first signal's."""
    save = Save(site, out, "pausing:body+close", "guest.dmp")
    save.wait_for("body")
    save.signal(signal.SIGINT)
    save.wait_for("closing")
    for second in (signal.SIGTERM, signal.SIGHUP):
        save.signal(second)
        save.wait_for_stderr(f"windump: {second.name}: finishing the cleanup first\n")
    save.go()
    status, stdout, stderr = save.finish()
    assert (status, stdout) == (130, "")
    assert stderr == ("windump: SIGTERM: finishing the cleanup first\n"
                      "windump: SIGHUP: finishing the cleanup first\n"
                      "windump: interrupted\n")
    assert save.seen[-2:] == ["closing", "closed"]
    assert os.listdir(out) == []


def test_a_signal_while_cleaning_up_after_an_error_waits(site, out):
    """The source fails mid-body; SIGTERM arrives while it is being closed: the close finishes and
    the error, which came first, is what windump reports."""
    save = Save(site, out, "pausing:fail+close", "guest.dmp")
    save.wait_for("closing")
    save.signal(signal.SIGTERM)
    save.wait_for_stderr("windump: SIGTERM: finishing the cleanup first\n")
    save.go()
    status, stdout, stderr = save.finish()
    assert (status, stdout) == (1, "")
    assert stderr == ("windump: SIGTERM: finishing the cleanup first\n"
                      "windump: error: pausing:fail+close: the guest went away\n")
    assert save.seen[-2:] == ["closing", "closed"]
    assert os.listdir(out) == []


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda signum: signum.name)
def test_a_signal_once_the_dump_is_in_place_changes_nothing(site, out, signum):
    """Sent while the source closes after the dump was installed: the close finishes, the summary
    is printed and the exit status is 0, since there is nothing left to undo."""
    save = Save(site, out, "pausing:close", "guest.dmp")
    save.wait_for("closing")
    assert os.listdir(out) == ["guest.dmp"]
    save.signal(signum)
    save.wait_for_stderr(f"windump: {signum.name}: finishing the cleanup first\n")
    save.go()
    status, stdout, stderr = save.finish()
    assert (status, stderr) == (0, f"windump: {signum.name}: finishing the cleanup first\n")
    assert stdout.startswith("wrote guest.dmp: ")
    assert save.seen[-2:] == ["closing", "closed"]
    assert os.listdir(out) == ["guest.dmp"]


def test_an_ignored_signal_stays_ignored(site, out):
    """Under nohup SIGHUP is ignored before windump starts: it must stay so, not end the save."""
    save = Save(site, out, "pausing:body", "guest.dmp", preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    save.wait_for("body")
    save.signal(signal.SIGHUP)
    save.signal(signal.SIGTERM)  # still handled: the save ends here, proving SIGHUP was let by
    status, stdout, stderr = save.finish()
    assert (status, stdout, stderr) == (143, "", "windump: interrupted by SIGTERM\n")
    assert os.listdir(out) == []


#: Run in gdb's Python: gdb's C handlers (as ``sigaction`` holds them) before, inside and after
#: :class:`interrupting`, which a SIGHUP sent inside must interrupt; printed as one JSON line.
IN_GDB = r'''
import ctypes, json, os, signal, struct, sys
sys.path.insert(0, {root!r})
from windump_plugins.frontends.signals import Interrupted, interrupting

libc = ctypes.CDLL(None)
def action(signum):  # sa_handler, the first word of sa_mask, sa_flags: what a handler is
    buffer = ctypes.create_string_buffer(512)
    libc.sigaction(signum, None, buffer)
    return [struct.unpack_from("<Q", buffer, 0)[0], struct.unpack_from("<Q", buffer, 8)[0],
            struct.unpack_from("<i", buffer, 136)[0]]
taken = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
before = {{s: action(s) for s in taken}}
seen = []
for attempt in range(2):  # a second windump-save in the same gdb takes them again
    try:
        with interrupting(*taken) as block:
            inside = {{s: action(s) for s in taken}}
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(1000):
                pass
        seen.append("not interrupted")
    except Interrupted as interrupt:
        seen.append(interrupt.signum)
    seen.append(all(inside[s] != before[s] for s in taken) and {{s: action(s)[:2] for s in taken}} == {{s: before[s][:2] for s in taken}})
print(json.dumps(seen))
'''


def test_windump_save_takes_gdbs_signals_only_while_it_runs(tmp_path, require):
    """In a real gdb: inside the block SIGHUP interrupts; afterwards gdb's own C handlers are back."""
    require("gdb")
    script = tmp_path / "in_gdb.py"
    script.write_text(IN_GDB.format(root=str(Path(__file__).resolve().parent.parent)))
    result = subprocess.run(["gdb", "-nx", "-batch", "-x", str(script)], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [signal.SIGHUP, True, signal.SIGHUP, True], result.stdout
