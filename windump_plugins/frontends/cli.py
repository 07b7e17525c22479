"""The ``windump`` command line: its subcommands declared in one table, and the one place that turns
errors into a single ``windump: error: ...`` line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import __version__
from ..errors import WindumpError
from ..hookspecs import SourceKind
from ..plugins import Plugins, load_plugins
from . import reports, signals
from .arguments import FORCE, QUIET, VERBOSE, Argument, arg
from .logs import log, log_lines

PROG = "windump"

#: Columns the subcommands' descriptions are wrapped to (their epilogs keep their own lines).
HELP_WIDTH = 79


@dataclass(frozen=True)
class Command:
    """A subcommand: everything its ``--help`` shows, and the function that runs it."""

    name: str
    summary: str
    description: str
    run: Callable[[argparse.Namespace, Plugins], int]
    arguments: tuple[Argument, ...] = ()
    examples: tuple[str, ...] = ()
    #: Whether ``--help`` lists the source kinds the loaded plugins open.
    lists_sources: bool = False
    #: The JSON Schema of what ``--json`` prints; None: the command has no ``--json``.
    json_schema: dict | None = None


COMMANDS: list[Command] = []

#: The arguments before COMMAND.
GLOBAL_ARGUMENTS = (
    arg("--debug", action="store_true", help="show a traceback on errors"),
    Argument(VERBOSE.flags, {**VERBOSE.options, "default": 0}),
    arg("--version", action="version", version=f"{PROG} {__version__}", help="print the version and exit"),
)

JSON = arg("--json", action="store_true", help="print one JSON object on stdout instead (schema in the docs)")


def command(name: str, summary: str, description: str, *, arguments: Sequence[Argument] = (),
            examples: Sequence[str] = (), lists_sources: bool = False, json_schema: dict | None = None) -> Callable:
    """Declare the decorated function as the subcommand ``name``; one with a ``json_schema`` takes ``--json``."""

    def register(run: Callable[[argparse.Namespace, Plugins], int]) -> Callable[[argparse.Namespace, Plugins], int]:
        every = (*arguments, JSON) if json_schema is not None else tuple(arguments)
        COMMANDS.append(Command(name, summary, description, run, every, tuple(examples), lists_sources, json_schema))
        return run

    return register


def _print_json(value: dict) -> None:
    print(json.dumps(value, indent=2))


#: The warning when a save's summary cannot be printed (the dump is written all the same).
UNPRINTED_SUMMARY = "{prog}: warning: {output} is written, but its summary could not be printed: {reason}\n"


def _print_saved(text: str, output: str) -> None:
    """Print a finished save's summary, flushed now. The dump is in place whatever stdout does: a
    full device, a closed pipe or a hung-up terminal is a warning (on stderr, while it works), not a
    failure; a file name that stdout's encoding cannot show is printed as the bytes it is on disk."""
    if sys.stdout is None:  # started with stdout closed
        _write_stderr(UNPRINTED_SUMMARY.format(prog=PROG, output=output, reason="stdout is closed"))
        return
    try:
        try:
            sys.stdout.write(text + "\n")
        except UnicodeEncodeError:  # surrogates standing for a name's undecodable bytes
            sys.stdout.flush()
            sys.stdout.buffer.write(os.fsencode(text + "\n"))
        sys.stdout.flush()
    except (OSError, ValueError) as exc:  # UnicodeEncodeError is a ValueError; so is a closed stdout
        _retire(sys.stdout)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _write_stderr(UNPRINTED_SUMMARY.format(prog=PROG, output=output, reason=reason))


def _retire(stream) -> None:
    """Point a standard stream that failed at /dev/null, so that the interpreter's last flush of what
    it still holds cannot fail too (Python would then exit with status 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's capture), or nothing to open
        pass


@command(
    "save",
    "write the crash dump of a guest",
    "Write a full Windows crash dump (PAGEDU64) of the guest memory in SOURCE to OUTPUT, using the "
    "dump header the guest's driver published through -device vmcoreinfo. OUTPUT appears only "
    "once complete; an existing OUTPUT is kept unless --force.",
    arguments=(
        arg("source", metavar="SOURCE", help="where the guest memory is: a file, or SCHEME:... (see below)"),
        arg("output", metavar="OUTPUT", help="the .dmp file to write"),
        FORCE,
        QUIET,
        VERBOSE,
        arg("--context-cpu", metavar="N", type=int,
            help="vCPU whose registers the header's context and exception record show (default 0)"),
    ),
    examples=(
        "windump save guest.elf guest.dmp     # from QEMU's dump-guest-memory",
        "windump save --context-cpu 1 guest.elf guest.dmp",
        "windump save sample: sample.dmp      # the built-in sample guest",
        "windump save 'sample:?cpus=4&ram=5G' big.dmp",
        "windump save qmp:/run/vm/qmp.sock guest.dmp   # a live QEMU; -qmp unix:...,server=on,wait=off",
        "windump -v save 'gdb://127.0.0.1:1234?keep-stopped' guest.dmp   # a live QEMU started with -s",
    ),
    lists_sources=True,
    json_schema=reports.SAVE_SCHEMA,
)
def _save(args: argparse.Namespace, plugins: Plugins) -> int:
    from ..save import save
    from ..writer import check_output
    from .logs import SaveTimer
    from .progress import progress_bar

    check_output(args.output, force=args.force, source_paths=_named_files(args.source))
    started = time.perf_counter()
    source = plugins.open_source(args.source)
    log.info("%s: opened in %.2f s", source.description or args.source, time.perf_counter() - started)
    try:
        with progress_bar(os.path.basename(args.output), enabled=not args.quiet and sys.stderr is not None) as progress:
            timer = SaveTimer(progress)
            report = save(source, args.output, plugins=plugins, force=args.force, progress=timer,
                          context_cpu=args.context_cpu)
    except BaseException:
        with signals.holding():  # a second signal must not cut short putting the guest back
            source.close()
        raise
    signals.hold()  # the dump is in place: nothing is left that a signal should undo
    source.close()
    timer.log(report)
    if args.json:
        _print_saved(json.dumps(reports.save_object(report), indent=2), report.output)
    elif not args.quiet:
        _print_saved(reports.summary_line(report), report.output)
    return 0


def _named_files(source: str) -> list[str]:
    """The existing files SOURCE may name, as itself or after ``SCHEME:`` (before ``?OPTIONS``): what
    OUTPUT must not be."""
    rest = source.partition(":")[2].partition("?")[0]
    return [path for path in (source, rest) if path and os.path.exists(path)]


@command(
    "info",
    "describe a crash dump",
    "Print what the header of the crash dump DUMP says: format, dump type, kernel addresses, "
    "bug check, processors and physical-memory runs.",
    arguments=(arg("dump", metavar="DUMP", help="a .dmp file"),),
    examples=("windump info guest.dmp", "windump info --json guest.dmp | jq -r .KdDebuggerDataBlock"),
    json_schema=reports.INFO_SCHEMA,
)
def _info(args: argparse.Namespace, plugins: Plugins) -> int:
    from ..verify import describe_dump, dump_info

    if args.json:
        _print_json(dump_info(args.dump))
    else:
        print(describe_dump(args.dump))
    return 0


@command(
    "verify",
    "check a crash dump the way debuggers read it",
    "Check that DUMP is a complete, consistent crash dump: signatures, runs, sizes, KDBG and "
    "processor contexts. Prints 'DUMP: ok', or one line per problem and exits with status 1.",
    arguments=(arg("dump", metavar="DUMP", help="a .dmp file"),),
    examples=("windump verify guest.dmp",),
    json_schema=reports.VERIFY_SCHEMA,
)
def _verify(args: argparse.Namespace, plugins: Plugins) -> int:
    from ..verify import verify_dump

    problems = verify_dump(args.dump)
    if args.json:
        _print_json(reports.verify_object(args.dump, problems))
    else:
        for problem in problems:
            print(f"{args.dump}: {problem}")
        if not problems:
            print(f"{args.dump}: ok")
    return 1 if problems else 0


@command(
    "plugins",
    "list the loaded plugins and the sources they open",
    "List each loaded plugin with its distribution, version and module, and the sources it opens "
    "with their options. WINDUMP_PLUGINS=a,b loads only those plugins; WINDUMP_DISABLE_PLUGINS=a,b "
    "skips them.",
    examples=("windump plugins", "WINDUMP_DISABLE_PLUGINS=sample windump plugins"),
    json_schema=reports.PLUGINS_SCHEMA,
)
def _plugins(args: argparse.Namespace, plugins: Plugins) -> int:
    described = plugins.describe()
    if args.json:
        _print_json(reports.plugins_object(described))
        return 0
    if not described:
        print("no plugins loaded")
    for info in described:
        origin = f"{info.dist} {info.version}" if info.dist else "(not installed)"
        print(f"{info.name}  {origin}  {info.module}")
        for kind in info.kinds:
            print("\n".join(source_lines(kind, indent=4)))
    return 0


@command(
    "gdb-script",
    "print the path of the gdb script that adds windump-save",
    "Print the path of windump.py for gdb's source command: inside a gdb attached to QEMU's gdbstub "
    "it adds the windump-save command. gdb's Python must import windump (see the gdb page of the docs).",
    examples=("gdb -ex 'target remote 127.0.0.1:1234' -ex \"source $(windump gdb-script)\" "
              "-ex 'windump-save guest.dmp'",),
)
def _gdb_script(args: argparse.Namespace, plugins: Plugins) -> int:
    from .gdb import print_script_path

    return print_script_path(args, plugins)


def source_lines(kind: SourceKind, indent: int = 2) -> list[str]:
    """A source kind for help: its pattern, then its summary and each option wrapped beneath it."""
    inner = " " * (indent + 4)
    lines = [" " * indent + kind.pattern, textwrap.fill(kind.summary, HELP_WIDTH, initial_indent=inner,
                                                         subsequent_indent=inner)]
    for option in kind.options:
        lines.append(textwrap.fill(option.described, HELP_WIDTH, initial_indent=f"{inner}?{option.usage}  ",
                                   subsequent_indent=inner + "    "))
    return lines


def _epilog(entry: Command, plugins: Plugins) -> str | None:
    parts = []
    if entry.lists_sources:
        lines = ["\n".join(source_lines(kind)) for kind in plugins.kinds()]
        parts.append("sources (options after ?, joined by &; quote them in a shell):\n"
                     + ("\n".join(lines) or "  (none: no source plugin loaded)"))
    if entry.examples:
        parts.append("examples:\n" + "\n".join(f"  {example}" for example in entry.examples))
    return "\n\n".join(parts) or None


def build_parser(plugins: Plugins) -> argparse.ArgumentParser:
    """The parser for every command in :data:`COMMANDS`; ``save --help`` lists ``plugins``' sources."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Turn the memory of a QEMU/KVM Windows guest into a crash dump that WinDbg opens.",
        epilog="Run 'windump COMMAND --help' for a command's arguments and examples.",
    )
    for argument in GLOBAL_ARGUMENTS:
        argument.add_to(parser)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for entry in COMMANDS:
        sub = subparsers.add_parser(
            entry.name,
            help=entry.summary,
            description=textwrap.fill(entry.description, HELP_WIDTH),
            epilog=_epilog(entry, plugins),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for argument in entry.arguments:
            argument.add_to(sub)
        sub.set_defaults(command=entry)
    return parser


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, WindumpError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return f"unexpected {type(exc).__name__}: {exc} (a bug in windump; --debug shows where)"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a plugin that failed to load, a header field QEMU would only warn about) as one line."""
    if file is None:
        _write_stderr(f"{PROG}: warning: {message}\n")
    else:
        print(f"{PROG}: warning: {message}", file=file)


def _write_stderr(text: str) -> None:
    """A line on stderr, above the progress bar when one is drawn (only ``save`` loads the bar's
    module); nothing once stderr is gone (a hung-up terminal), which must not end the command."""
    progress = sys.modules.get(f"{__package__}.progress")
    if sys.stderr is None:  # started with stderr closed
        return
    try:
        if progress is None:
            sys.stderr.write(text)
            sys.stderr.flush()
        else:
            progress.write_above(text)
    except (OSError, ValueError):
        _retire(sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status is 0 on success, 1 on an error, 128 + N after signal N
    (130 after Ctrl-C; ``python -m windump_plugins`` makes SIGTERM, SIGHUP and SIGQUIT interrupt too)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            plugins = load_plugins()
            args = build_parser(plugins).parse_args(argv)
            with log_lines(PROG, _write_stderr, args.verbose):
                return args.command.run(args, plugins)
        except KeyboardInterrupt as interrupt:
            if args.debug if args else "--debug" in argv:
                traceback.print_exc()
            _write_stderr(signals.interrupted_line(PROG, interrupt) + "\n")
            return signals.exit_status(interrupt)
        except Exception as exc:  # the front end's one place to turn any failure into one line
            if args.debug if args else "--debug" in argv:
                traceback.print_exc()
            _write_stderr(f"{PROG}: error: {_error_line(exc)}\n")
            return 1
