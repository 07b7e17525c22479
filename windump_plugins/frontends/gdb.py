"""The package side of ``windump-save`` inside gdb: a connection adapter that lets the ``gdb://``
source talk through the connection gdb already holds to QEMU's gdbstub, and the command's
arguments, progress line and run; ``gdb/windump.py`` only registers the command.

QEMU's stub serves one client at a time, so inside gdb windump cannot open its own connection. It
uses gdb's: control packets (``qqemu.Supported``, ``Qqemu.PhyMemMode``) go through
``RemoteTargetConnection.send_packet``, monitor commands through gdb's ``monitor`` (which collects
the ``O`` output packets that ``send_packet`` would leave behind), registers through gdb's frame
API, and guest RAM, fastest first, from QEMU's process memory, from ``m`` requests pipelined on
gdb's own socket, or from gdb's ``read_memory``. Nothing here resumes the guest.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import importlib.util
from pathlib import Path

from ..errors import WindumpError
from ..live.gdbconnection import GdbConnection
from ..writer import ProgressCallback

#: Seconds between two redraws of the progress line.
PROGRESS_INTERVAL = 0.5

#: The script file inside the package (a wheel carries ``gdb/windump.py`` there; see pyproject.toml).
SCRIPT_PACKAGE, SCRIPT_NAME = "windump_plugins.gdb", "windump.py"


def script_path() -> Path:
    """Where ``windump.py`` for gdb's ``source`` is: the installed copy, else the checkout's ``gdb/``
    (an editable install maps only ``windump_plugins`` itself)."""
    spec = importlib.util.find_spec(SCRIPT_PACKAGE)  # a namespace package: gdb/ has no __init__.py
    for directory in spec.submodule_search_locations if spec else ():
        if (Path(directory) / SCRIPT_NAME).is_file():
            return Path(directory) / SCRIPT_NAME
    checkout = Path(__file__).resolve().parent.parent / "gdb" / SCRIPT_NAME
    if checkout.is_file():
        return checkout
    raise WindumpError(f"the gdb script {SCRIPT_NAME} is not installed with windump_plugins and no checkout holds it")


def print_script_path(args: argparse.Namespace, plugins: object) -> int:
    """``windump gdb-script``: print the path to give gdb's ``source`` command."""
    print(script_path())
    return 0


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors raised as one WindumpError line instead of exiting gdb."""

    def error(self, message: str):
        raise WindumpError(f"{message} (usage: {self.format_usage().strip().removeprefix('usage: ')})")


def _address(text: str) -> int:
    return int(text, 0)


def save_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="windump-save", add_help=False)
    parser.add_argument("-f", "--force", action="store_true", default=None)
    parser.add_argument("--packets-only", action="store_true", default=None)
    parser.add_argument("--header-pa", metavar="ADDR", type=_address)
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("output", metavar="FILE")
    return parser


@dataclass(frozen=True)
class Settings:
    """The ``set windump ...`` defaults that command-line options override."""

    force: bool = False
    packets_only: bool = False
    progress: bool = True


def progress_line(write: Callable[[str], None], *, interval: float = PROGRESS_INTERVAL,
                  clock: Callable[[], float] = time.monotonic) -> ProgressCallback:
    """A writer progress callback drawing one ``\\r``-rewritten line at most every ``interval``
    seconds (and at the end, which also clears it), so a fast dump is not slowed by the terminal."""
    started = clock()
    last = [-interval]

    def progress(done: int, total: int) -> None:
        now = clock()
        if done < total and now - last[0] < interval:
            return
        last[0] = now
        if done >= total:
            write("\r\x1b[K")
            return
        rate = done / max(now - started, 1e-9) / 1e6
        write(f"\rwindump-save: {100 * done // max(total, 1):3d}% {done >> 20}/{total >> 20} MiB {rate:.0f} MB/s\x1b[K")

    return progress


def save_in_gdb(argv: Sequence[str], settings: Settings, *, write: Callable[[str], None],
                terminal: bool, timeout: float = 10.0) -> str:
    """Run ``windump-save ARGV`` in gdb: write the dump of the guest gdb is attached to, and return
    the summary line (empty with ``--quiet``). Expected failures raise WindumpError; the guest stays stopped."""
    from ..save import save
    from ..sources.gdbstub import GdbStubSource

    options = save_parser().parse_args(list(argv))
    force = settings.force if options.force is None else options.force
    packets = settings.packets_only if options.packets_only is None else options.packets_only
    stub = GdbConnection(timeout)
    source = GdbStubSource.through(stub, description=f"gdb://{stub.address}", header_pa=options.header_pa,
                                   packets=packets)
    progress = progress_line(write) if settings.progress and terminal and not options.quiet else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = save(source, options.output, force=force, progress=progress, context_cpu=stub.selected_cpu)
        except BaseException:
            with contextlib.suppress(WindumpError):  # restoring over a dead connection: the first error tells why
                source.close()
            raise
        source.close()
    for warning in caught:
        write(f"windump-save: warning: {warning.message}\n")
    if options.quiet:
        return ""
    how = "QEMU's process memory" if source.path == "procmem" else f"packets ({source.fast_path_problem})"
    return (f"windump-save: wrote {report.output}: {report.bytes_written >> 20} MiB, {report.runs} runs, "
            f"{report.seconds:.1f} s, {report.bytes_per_second / 1e6:.0f} MB/s from {how}; "
            f"header context: vCPU {stub.selected_cpu}")
