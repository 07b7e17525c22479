"""The package side of ``windump-save`` inside gdb: the command's arguments, settings, progress line
and run; ``gdb/windump.py`` only registers the command.

QEMU's stub serves one client at a time, so inside gdb windump cannot open its own connection: the
``gdb://`` source reads through gdb's, by the adapter in :mod:`windump_plugins.live.gdbconnection`.
Nothing here resumes the guest.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import signal
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import WindumpError
from ..live.gdbconnection import GdbConnection
from ..plugins import Plugins, load_plugins
from ..sources.gdbstub import OPTIONS as STUB_OPTIONS
from ..sources.gdbstub import GdbStubSource
from ..writer import ProgressCallback, check_output
from .arguments import FORCE, QUIET, VERBOSE, option_argument
from .logs import SaveTimer, log, log_lines
from .reports import summary_line
from .signals import interrupting

#: Seconds between two redraws of the progress line.
PROGRESS_INTERVAL = 0.5

#: Columns ``help windump-save`` is wrapped to.
HELP_WIDTH = 79

#: The script file inside the package (a wheel carries ``gdb/windump.py`` there; see pyproject.toml).
SCRIPT_PACKAGE, SCRIPT_NAME = "windump_plugins.gdb", "windump.py"


def script_path() -> Path:
    """Where ``windump.py`` for gdb's ``source`` is: the installed copy, else the checkout's ``gdb/``
    (an editable install maps only ``windump_plugins`` itself)."""
    spec = importlib.util.find_spec(SCRIPT_PACKAGE)  # a namespace package: gdb/ has no __init__.py
    for directory in (spec.submodule_search_locations or ()) if spec else ():
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
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        raise WindumpError(f"{message} (usage: {usage})")


#: The first line of ``help windump-save``, which gdb also lists under ``help files``.
SUMMARY = "Write a Windows crash dump of the QEMU guest gdb is attached to."

DESCRIPTION = (
    "Writes a full Windows crash dump (PAGEDU64) of the guest behind QEMU's gdbstub to FILE, using the "
    "dump header the guest's driver published (found in RAM, or at --header-pa ADDR). FILE appears only "
    "once complete. The guest stays stopped: windump never resumes it. The vCPU selected in gdb "
    "(thread N = vCPU N-1) gives the header's context. RAM is read from QEMU's process memory when QEMU "
    "runs on this host and we may read it, else through the stub in physical-memory mode (restored "
    "afterwards, on errors and Ctrl-C too)."
)

EXAMPLES = (
    "windump-save guest.dmp",
    "thread 2",
    "windump-save --force --packets /tmp/guest.dmp",
    "windump-save --header-pa 0x7fe000 guest.dmp",
)

#: The gdb:// options that windump-save takes too: all but keep-stopped, since inside gdb windump
#: never resumes the guest.
SAVE_OPTIONS = tuple(option for option in STUB_OPTIONS if option.name != "keep-stopped")


@dataclass(frozen=True)
class Setting:
    """A ``set windump NAME on|off`` setting; for a NAME that is also a ``windump-save --NAME`` flag,
    the flag's default."""

    name: str
    #: What windump-save does when it is on, said as an order ("replace FILE if it exists").
    doc: str
    default: bool

    @property
    def keyword(self) -> str:
        return self.name.replace("-", "_")


def _option_doc(name: str) -> str:
    return next(option.help for option in SAVE_OPTIONS if option.name == name)


SETTINGS = (
    Setting("force", "replace FILE if it exists", False),
    Setting("packets", _option_doc("packets"), False),
    Setting("progress", "draw a progress line when gdb's output is a terminal", True),
    Setting("verbose", "log which memory path ran, why, and how long each phase took, as -v does", False),
)


@dataclass(frozen=True)
class Settings:
    """The ``set windump ...`` values (:data:`SETTINGS`) that command-line options override."""

    force: bool = False
    packets: bool = False
    progress: bool = True
    verbose: bool = False


def _setting_note(name: str) -> str:
    return f"default: set windump {name}" if any(setting.name == name for setting in SETTINGS) else ""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, width=HELP_WIDTH)


def save_parser() -> argparse.ArgumentParser:
    """The one parser of ``windump-save``: its arguments, and the help text gdb shows."""
    settings = "\n".join(f"  set windump {setting.name} on|off\n" + textwrap.fill(
        f"{setting.doc} (default {'on' if setting.default else 'off'})", HELP_WIDTH, initial_indent=" " * 6,
        subsequent_indent=" " * 6) for setting in SETTINGS)
    parser = _ArgumentParser(
        prog="windump-save", add_help=False, formatter_class=_formatter,
        description=textwrap.fill(DESCRIPTION, HELP_WIDTH),
        epilog=(f"settings (show windump lists them):\n{settings}\n\n"
                "examples:\n" + "\n".join(f"  {example}" for example in EXAMPLES)),
    )
    FORCE.add_to(parser, default=None, help=f"replace FILE if it exists ({_setting_note('force')})")
    for option in SAVE_OPTIONS:
        option_argument(option, default_note=_setting_note(option.name)).add_to(parser)
    QUIET.add_to(parser)
    VERBOSE.add_to(parser, help=f"{VERBOSE.options['help']} (-v: set windump verbose on)")
    parser.add_argument("output", metavar="FILE", help="the .dmp file to write")
    return parser


def save_help() -> str:
    """``help windump-save``: the summary line, then what :func:`save_parser` says."""
    return f"{SUMMARY}\n{save_parser().format_help().rstrip()}"


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


#: The signals windump-save takes from gdb while it runs, so that they interrupt it as Ctrl-C does
#: (gdb's own handlers would let a hangup wait for the end of the dump, ignore SIGQUIT, and answer
#: SIGTERM with a quit that can cut short the packet restoring PhyMemMode); gdb gets each back,
#: and the one that arrived, afterwards. Ctrl-C stays gdb's: it is how gdb interrupts its own waits.
TAKEN_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@functools.cache
def session_plugins() -> Plugins:
    """The plugins, loaded once per gdb session: every windump-save after the first starts at once."""
    return load_plugins()


def save_in_gdb(argv: Sequence[str], settings: Settings, *, write: Callable[[str], None], terminal: bool) -> str:
    """Run ``windump-save ARGV`` in gdb: write the dump of the guest gdb is attached to, and return
    the summary line (empty with ``--quiet``). Expected failures raise WindumpError; Ctrl-C and
    :data:`TAKEN_SIGNALS` a KeyboardInterrupt, after the cleanup. The guest stays stopped."""
    from ..save import save

    options = save_parser().parse_args(list(argv))
    force = settings.force if options.force is None else options.force
    packets = settings.packets if options.packets is None else options.packets
    verbosity = max(getattr(options, "verbose", 0), int(settings.verbose))
    drawing = settings.progress and terminal and not options.quiet

    def write_line(text: str) -> None:  # above the progress line, which the next report redraws
        write("\r\x1b[K" + text if drawing else text)

    with interrupting(*TAKEN_SIGNALS) as signals, log_lines("windump-save", write_line, verbosity), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ImportWarning)  # gdb's own import hooks, when plugins load
        check_output(options.output, force=force)  # before gdb's connection is used at all
        started = time.perf_counter()
        stub = GdbConnection(options.timeout)
        source = GdbStubSource.through(stub, description=f"gdb://{stub.address}", header_pa=options.header_pa,
                                       packets=packets)
        log.info("%s: opened in %.2f s", source.description, time.perf_counter() - started)
        timer = SaveTimer(progress_line(write) if drawing else None)
        try:
            report = save(source, options.output, plugins=session_plugins(), force=force, progress=timer,
                          context_cpu=stub.selected_cpu)
        except BaseException:
            with contextlib.suppress(WindumpError):  # restoring over a dead connection: the first error tells why
                source.close()
            raise
        signals.hold()  # the dump is in place: a signal now waits for the rest, then goes to gdb
        source.close()
        timer.log(report)
    for warning in caught:
        write(f"windump-save: warning: {warning.message}\n")
    if options.quiet:
        return ""
    return f"windump-save: {summary_line(report)}; header context: vCPU {stub.selected_cpu}"
