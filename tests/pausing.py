"""A live-like test source that stops at a named phase of a save until the test lets it go, and the
harness that runs ``windump save`` on it: the test sees each phase as it happens, so it can send a
signal exactly there instead of after a guessed sleep.

``pausing:PHASES`` (PHASES joined by ``+``) serves the sample guest and stops:

- ``open``: while the source opens (before windump has a source to close);
- ``header``: at its first read, while the dump header is prepared;
- ``body``: at its fourth read of a whole write buffer, once the temporary dump holds part of the body;
- ``close``: in ``close()``, the step that resumes a live guest.

``fail`` makes that fourth read fail with a SourceError instead (after ``body`` is reported).

It reports ``open``, ``header``, ``body``, ``resumed`` (``reading_done``), ``closing`` and
``closed`` on the events pipe; a stop lasts until the test writes a byte to the go pipe or a signal
interrupts it. The plugin is installed as a ``.dist-info`` on PYTHONPATH, as a third party's would be.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

from corpus import BUILT_IN_PLUGINS

PLUGIN = '''
import os

from windump_plugins.errors import SourceError
from windump_plugins.hookspecs import SourceKind, hookimpl
from windump_plugins.source import MemorySource
from windump_plugins.sources.sample import open_sample

EVENTS, GO = int(os.environ["PAUSING_EVENTS_FD"]), int(os.environ["PAUSING_GO_FD"])


def report(event, stop=False):
    os.write(EVENTS, event.encode() + b"\\n")
    if stop:
        os.read(GO, 1)


class PausingSource(MemorySource):
    def __init__(self, location, phases):
        self.sample = open_sample("sample:")
        self.description, self.phases = location, phases
        self.reads = self.buffers = 0

    @property
    def ram(self):
        return self.sample.ram

    def readinto(self, address, buffer):
        self.reads += 1
        self.buffers += len(buffer) >= 1 << 20
        if self.reads == 1:
            report("header", "header" in self.phases)
        if self.buffers == 4 and len(buffer) >= 1 << 20:
            report("body", "body" in self.phases)
            if "fail" in self.phases:
                raise SourceError(f"{self.description}: the guest went away")
        self.sample.readinto(address, buffer)

    def vmcoreinfo(self):
        return self.sample.vmcoreinfo()

    def cpus(self):
        return self.sample.cpus()

    def reading_done(self):
        report("resumed")

    def close(self):
        report("closing", "close" in self.phases)
        report("closed")


@hookimpl
def windump_open_location(location):
    if not location.startswith("pausing:"):
        return None
    phases = set(location.removeprefix("pausing:").split("+"))
    report("open", "open" in phases)
    return PausingSource(location, phases)


@hookimpl
def windump_source_kinds():
    return [SourceKind("pausing:PHASES", "the sample guest, stopping at PHASES until let go")]
'''


def install_plugin(site: Path) -> Path:
    """The pausing plugin as distribution ``pausingplug 1.0`` in ``site``, for PYTHONPATH."""
    (site / "pausingplug-1.0.dist-info").mkdir(parents=True)
    (site / "pausingplug-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: pausingplug\nVersion: 1.0\n")
    (site / "pausingplug-1.0.dist-info" / "entry_points.txt").write_text("[windump]\npausing = windump_test_pausing\n")
    (site / "windump_test_pausing.py").write_text(PLUGIN)
    return site


class Save:
    """``python -m windump_plugins save ARGS`` in ``cwd`` with the pausing plugin, its phases seen
    through :meth:`wait_for`, its stderr through :meth:`wait_for_stderr`, let go with :meth:`go`."""

    def __init__(self, site: Path, cwd: Path, *args: str | bytes, env: dict[str, str] | None = None,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen) -> None:
        events, events_writer = os.pipe()
        go_reader, self._go = os.pipe()
        environ = {key: value for key, value in os.environ.items() if not key.startswith("WINDUMP_")}
        environ.update(WINDUMP_PLUGINS=f"{BUILT_IN_PLUGINS},pausing", PYTHONPATH=str(site),
                       PAUSING_EVENTS_FD=str(events_writer), PAUSING_GO_FD=str(go_reader), **(env or {}))
        self.process = subprocess.Popen([sys.executable, "-m", "windump_plugins", "save", *args], cwd=cwd, env=environ,
                                        stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                        pass_fds=(events_writer, go_reader), **popen)
        os.close(events_writer)
        os.close(go_reader)
        self.seen: list[str] = []
        self._events, self._event_bytes = events, b""
        self._stderr = b""

    def _read(self, fd: int, what: str, timeout: float) -> bytes:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no {what} within {timeout} s; seen {self.seen}, stderr {self._stderr!r}"
        chunk = os.read(fd, 65536)
        assert chunk, f"windump ended before {what}; seen {self.seen}, stderr {self._stderr!r}"
        return chunk

    def wait_for(self, event: str, timeout: float = 60) -> None:
        """Block until the source reports ``event`` (AssertionError if windump ends first)."""
        while event not in self.seen:
            while b"\n" not in self._event_bytes:
                self._event_bytes += self._read(self._events, repr(event), timeout)
            line, self._event_bytes = self._event_bytes.split(b"\n", 1)
            self.seen.append(line.decode())

    def wait_for_stderr(self, text: str, timeout: float = 60) -> None:
        """Block until windump's stderr (a pipe) holds ``text``."""
        while text.encode() not in self._stderr:
            self._stderr += self._read(self.process.stderr.fileno(), repr(text), timeout)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def go(self) -> None:
        os.write(self._go, b"g")

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Wait for windump to exit: its status, stdout and stderr (as text when they were pipes);
        :attr:`seen` then holds every event it reported."""
        out, err = self.process.communicate(timeout=timeout)
        rest = self._event_bytes
        while chunk := os.read(self._events, 65536):
            rest += chunk
        self.seen += [line.decode() for line in rest.split(b"\n") if line]
        os.close(self._events)
        os.close(self._go)
        err = self._stderr + err if err is not None else None
        return (self.process.returncode, out.decode(errors="surrogateescape") if out is not None else "",
                err.decode(errors="surrogateescape") if err is not None else "")
