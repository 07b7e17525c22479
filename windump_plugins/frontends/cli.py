"""The ``windump`` command line: its subcommands declared in one table, and the one place that turns
errors into a single ``windump: error: ...`` line."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..errors import WindumpError
from ..plugins import Plugins, load_plugins

PROG = "windump"

#: Exit status after Ctrl-C, as a shell reports a process killed by SIGINT.
EXIT_INTERRUPTED = 130

#: Columns the subcommands' descriptions are wrapped to (their epilogs keep their own lines).
HELP_WIDTH = 79


@dataclass(frozen=True)
class Argument:
    """One argparse argument: its flags or name, and the keywords of ``add_argument``."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Argument:
    return Argument(flags, options)


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


COMMANDS: list[Command] = []


def command(name: str, summary: str, description: str, *, arguments: Sequence[Argument] = (),
            examples: Sequence[str] = (), lists_sources: bool = False) -> Callable:
    """Declare the decorated function as the subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace, Plugins], int]) -> Callable[[argparse.Namespace, Plugins], int]:
        COMMANDS.append(Command(name, summary, description, run, tuple(arguments), tuple(examples), lists_sources))
        return run

    return register


def _size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.2f} {unit}"
    return f"{count} bytes"


@command(
    "save",
    "write the crash dump of a guest",
    "Write a full Windows crash dump (PAGEDU64) of the guest memory in SOURCE to OUTPUT, using the "
    "dump header the guest's driver published through -device vmcoreinfo. OUTPUT appears only "
    "once complete; an existing OUTPUT is kept unless --force.",
    arguments=(
        arg("source", metavar="SOURCE", help="where the guest memory is: a file, or SCHEME:... (see below)"),
        arg("output", metavar="OUTPUT", help="the .dmp file to write"),
        arg("-f", "--force", action="store_true", help="replace OUTPUT if it exists"),
        arg("-q", "--quiet", action="store_true", help="no progress bar and no summary line"),
        arg("--context-cpu", metavar="N", type=int,
            help="vCPU whose registers the header's context and exception record show (default 0)"),
    ),
    examples=(
        "windump save guest.elf guest.dmp     # from QEMU's dump-guest-memory",
        "windump save --context-cpu 1 guest.elf guest.dmp",
        "windump save sample: sample.dmp      # the built-in sample guest",
        "windump save qmp:/run/vm/qmp.sock guest.dmp   # a live QEMU; -qmp unix:...,server=on,wait=off",
        "windump save gdb://127.0.0.1:1234 guest.dmp   # a live QEMU started with -s",
    ),
    lists_sources=True,
)
def _save(args: argparse.Namespace, plugins: Plugins) -> int:
    from .progress import progress_bar
    from ..save import save

    source = plugins.open_source(args.source)
    try:
        with progress_bar(os.path.basename(args.output), enabled=not args.quiet) as progress:
            report = save(source, args.output, plugins=plugins, force=args.force, progress=progress, context_cpu=args.context_cpu)
    finally:
        source.close()
    if not args.quiet:
        rate = report.bytes_per_second / 1e6
        paused = getattr(source, "paused_seconds", None)
        pause = "" if paused is None else f", guest paused {paused:.2f} s"
        print(f"wrote {report.output}: {_size(report.bytes_written)}, {report.runs} runs, "
              f"{report.pages} pages, {report.seconds:.1f} s, {rate:.0f} MB/s{pause}")
    return 0


@command(
    "info",
    "describe a crash dump",
    "Print what the header of the crash dump DUMP says: format, dump type, kernel addresses, "
    "bug check, processors and physical-memory runs.",
    arguments=(arg("dump", metavar="DUMP", help="a .dmp file"),),
    examples=("windump info guest.dmp",),
)
def _info(args: argparse.Namespace, plugins: Plugins) -> int:
    from ..verify import describe_dump

    print(describe_dump(args.dump))
    return 0


@command(
    "verify",
    "check a crash dump the way debuggers read it",
    "Check that DUMP is a complete, consistent crash dump: signatures, runs, sizes, KDBG and "
    "processor contexts. Prints 'DUMP: ok', or one line per problem and exits with status 1.",
    arguments=(arg("dump", metavar="DUMP", help="a .dmp file"),),
    examples=("windump verify guest.dmp",),
)
def _verify(args: argparse.Namespace, plugins: Plugins) -> int:
    from ..verify import verify_dump

    problems = verify_dump(args.dump)
    for problem in problems:
        print(f"{args.dump}: {problem}")
    if problems:
        return 1
    print(f"{args.dump}: ok")
    return 0


@command(
    "plugins",
    "list the loaded plugins and the sources they open",
    "List each loaded plugin with its distribution, version and module, and the sources it opens. "
    "WINDUMP_PLUGINS=a,b loads only those plugins; WINDUMP_DISABLE_PLUGINS=a,b skips them.",
    examples=("windump plugins", "WINDUMP_DISABLE_PLUGINS=sample windump plugins"),
)
def _plugins(args: argparse.Namespace, plugins: Plugins) -> int:
    described = plugins.describe()
    if not described:
        print("no plugins loaded")
    for info in described:
        origin = f"{info.dist} {info.version}" if info.dist else "(not installed)"
        print(f"{info.name}  {origin}  {info.module}")
        for kind in info.kinds:
            print(f"    {kind.pattern:<24} {kind.summary}")
    return 0


@command(
    "gdb-script",
    "print the path of the gdb script that adds windump-save",
    "Print the path of windump.py for gdb's source command: inside a gdb attached to QEMU's gdbstub "
    "it adds the windump-save command. gdb's Python must import windump (see the gdb page of the docs).",
    examples=("gdb -ex 'target remote 127.0.0.1:1234' -ex \"source $(windump gdb-script)\" -ex 'windump-save guest.dmp'",),
)
def _gdb_script(args: argparse.Namespace, plugins: Plugins) -> int:
    from .gdb import print_script_path

    return print_script_path(args, plugins)


def _epilog(entry: Command, plugins: Plugins) -> str | None:
    parts = []
    if entry.lists_sources:
        kinds = plugins.kinds()
        lines = [f"  {kind.pattern}\n" + textwrap.fill(kind.summary, HELP_WIDTH, initial_indent=" " * 6,
                                                     subsequent_indent=" " * 6) for kind in kinds]
        parts.append("sources:\n" + ("\n".join(lines) or "  (none: no source plugin loaded)"))
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
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
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
            sub.add_argument(*argument.flags, **argument.options)
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
    print(f"{PROG}: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status is 0 on success, 1 on an error, 130 after Ctrl-C."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            plugins = load_plugins()
            args = build_parser(plugins).parse_args(argv)
            return args.command.run(args, plugins)
        except KeyboardInterrupt:
            if args.debug if args else "--debug" in argv:
                traceback.print_exc()
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as exc:  # the front end's one place to turn any failure into one line
            if args.debug if args else "--debug" in argv:
                traceback.print_exc()
            print(f"{PROG}: error: {_error_line(exc)}", file=sys.stderr)
            return 1
