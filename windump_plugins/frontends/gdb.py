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
import importlib.util
import os
import signal
import socket
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError, WindumpError
from ..live.rsp import QemuQueries, RemoteStub, parse_supported
from ..sources.gdbstub import OPTIONS as STUB_OPTIONS
from ..sources.gdbstub import GdbStubSource
from ..writer import ProgressCallback
from .arguments import FORCE, QUIET, VERBOSE, option_argument
from .logs import SaveTimer, log, log_lines
from .reports import summary_line
from .signals import interrupting

#: The features gdb announces in its own ``qSupported``, repeated to learn the stub's PacketSize
#: without changing what gdb negotiated.
GDB_SUPPORTED = b"qSupported:multiprocess+;xmlRegisters=i386"

#: Bytes per ``read_memory`` call on the slowest path (gdb splits it into ``m`` packets itself).
READ_MEMORY_CHUNK = 1 << 20

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


def _tcp_endpoint(details: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``target remote`` argument (``HOST:PORT``, ``tcp:HOST:PORT``, ``:PORT``),
    None for pipes, serial lines and unix sockets."""
    for prefix in ("tcp:", "tcp4:", "tcp6:"):
        details = details.removeprefix(prefix)
    host, _, port = details.rpartition(":")
    if not port.isdigit() or "|" in details or details.startswith("/"):
        return None
    return host.strip("[]") or "localhost", int(port)


def _unmapped(address: str) -> str:
    return address.removeprefix("::ffff:")


def gdb_socket(details: str) -> socket.socket | None:
    """A duplicate of the socket in this process (gdb) connected to the stub ``details`` names, or None.

    gdb does not expose its file descriptor, so each socket in ``/proc/self/fd`` is matched by its
    peer address against ``details``. The duplicate shares gdb's open file, so it reads and writes
    the very same connection.
    """
    endpoint = _tcp_endpoint(details)
    if endpoint is None:
        return None
    host, port = endpoint
    try:
        addresses = {_unmapped(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return None
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            candidate = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            if candidate.family in (socket.AF_INET, socket.AF_INET6) and candidate.type == socket.SOCK_STREAM:
                peer = candidate.getpeername()
                if peer[1] == port and _unmapped(peer[0]) in addresses:
                    return candidate
        except OSError:
            pass
        candidate.close()
    return None


def register_value(value) -> int | None:
    """A gdb register value as an unsigned integer of its raw bits (x87 registers too), None when
    unavailable. Vector registers are unions: their ``uint128`` member holds the bits."""
    import gdb

    if value.type.strip_typedefs().code == gdb.TYPE_CODE_UNION:
        value = value["uint128"]
    try:
        return int(value.format_string(format="x"), 16)
    except ValueError:  # "<unavailable>"
        return None


class GdbConnection(QemuQueries):
    """QEMU's gdbstub through gdb's own connection, for :meth:`GdbStubSource.through`.

    Which channel serves what, and why:

    - control packets: ``send_packet``, gdb's synchronous one-packet exchange, so gdb stays in
      charge of its connection's state;
    - monitor commands: gdb's ``monitor``, because ``qRcmd`` answers with several packets;
    - registers: gdb's frame API, one thread per vCPU. Sending ``Hg``/``g`` behind gdb's back would
      leave gdb believing another thread is selected and showing one vCPU's registers as another's;
      through gdb they come from its register cache in the names of its target description. They
      are read once, before physical-memory mode, because gdb reads code memory to build frames;
    - guest RAM (when the source has no process-memory fast path): ``m`` requests pipelined on a
      duplicate of gdb's socket, 64 in flight, like :class:`RemoteStub`. ``send_packet`` and
      ``read_memory`` pay a round trip per 2 KiB packet (about 14 and 10 MiB/s here, gdb's own
      ``dump memory`` speed); pipelining is about ten times that. gdb reads nothing from its socket
      while a Python command runs, and every reply is read (and acked) before control returns to
      gdb, Ctrl-C included, so gdb finds its connection as it left it. Without a TCP socket (a pipe
      or serial line) ``read_memory`` is the fallback.
    """

    #: gdb attached, not windump: windump never resumes the guest.
    stopped_running_vm = False

    def __init__(self, timeout: float = 10.0) -> None:
        import gdb

        self._gdb = gdb
        inferior = gdb.selected_inferior()
        connection = inferior.connection
        if not isinstance(connection, gdb.RemoteTargetConnection):
            raise SourceError("gdb is not connected to a gdbstub: run 'target remote HOST:PORT' to QEMU's -gdb port first")
        threads = inferior.threads()
        if not threads:
            raise SourceError(f"gdb's remote target {connection.details} has no threads (no vCPUs)")
        if any(thread.is_running() for thread in threads):
            raise SourceError("the guest is running: interrupt it in gdb first (windump reads a stopped VM)")
        self.address = connection.details or connection.type
        self._inferior = inferior
        self._connection = connection
        self.features = parse_supported(self.command(GDB_SUPPORTED))
        self.selected_cpu, self._registers = self._read_vcpu_registers(threads)
        self._socket = gdb_socket(self.address)
        self._bulk: RemoteStub | None = None
        if self._socket is not None:
            blocking = self._socket.getblocking()
            self._bulk = RemoteStub(*_tcp_endpoint(self.address), timeout, connection=self._socket,
                                    features=self.features)
            os.set_blocking(self._socket.fileno(), blocking)  # gdb's file again as gdb had it

    def command(self, payload: bytes | str) -> bytes:
        try:
            return self._connection.send_packet(payload)
        except self._gdb.error as error:
            raise SourceError(f"gdb://{self.address}: {error}") from None

    def monitor(self, command: str) -> str:
        try:  # gdb passes QEMU's CRLF line ends through
            return self._gdb.execute(f"monitor {command}", to_string=True).replace("\r\n", "\n")
        except self._gdb.error as error:
            raise SourceError(f"gdb://{self.address}: monitor {command}: {error}") from None

    @property
    def connection(self) -> socket.socket | None:
        return self._socket

    def _read_vcpu_registers(self, threads: Sequence) -> tuple[int, list[dict[str, int]]]:
        """The index of gdb's selected thread among the vCPUs, and each vCPU's registers."""
        gdb = self._gdb
        selected, frame = gdb.selected_thread(), gdb.selected_frame()
        vcpus = sorted(threads, key=lambda thread: thread.ptid[:2])  # QEMU thread id = CPU index + 1
        states = []
        try:
            for thread in vcpus:
                thread.switch()
                newest = gdb.newest_frame()
                values = {r.name: register_value(newest.read_register(r.name)) for r in newest.architecture().registers("save")}
                states.append({name: value for name, value in values.items() if value is not None})
        finally:
            selected.switch()
            frame.select()
        return vcpus.index(selected), states

    def vcpu_registers(self) -> list[dict[str, int]]:
        return self._registers

    def readinto(self, address: int, buffer: memoryview) -> None:
        view = memoryview(buffer).cast("B")
        if self._bulk is None:
            for offset in range(0, len(view), READ_MEMORY_CHUNK):
                piece = view[offset : offset + READ_MEMORY_CHUNK]
                try:
                    piece[:] = self._inferior.read_memory(address + offset, len(piece))
                except self._gdb.error as error:
                    raise SourceError(f"gdb://{self.address}: {error}") from None
            return
        try:
            self._bulk.readinto(address, view)
        except BaseException:
            with contextlib.suppress(SourceError):
                self._bulk.settle()  # replies an interrupted pipeline left in flight: gdb must not see them
            raise
        self._bulk.settle()

    def read_memory(self, address: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.readinto(address, memoryview(buffer))
        return bytes(buffer)

    def detach(self) -> None:
        """Never: gdb holds the connection, and detaching would resume the guest under it."""

    def close(self) -> None:
        """Close our duplicate of gdb's socket and drop what gdb cached while memory was physical."""
        if self._socket is not None:
            self._socket.close()
        with contextlib.suppress(self._gdb.error):
            self._gdb.execute("maintenance flush dcache", to_string=True)
        self._gdb.invalidate_cached_frames()


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
        started = time.perf_counter()
        stub = GdbConnection(options.timeout)
        source = GdbStubSource.through(stub, description=f"gdb://{stub.address}", header_pa=options.header_pa,
                                       packets=packets)
        log.info("%s: opened in %.2f s", source.description, time.perf_counter() - started)
        timer = SaveTimer(progress_line(write) if drawing else None)
        try:
            report = save(source, options.output, force=force, progress=timer, context_cpu=stub.selected_cpu)
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
