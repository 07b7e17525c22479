"""``python -m windump_plugins``: the ``windump`` command line, every handled signal (Ctrl-C, SIGTERM,
SIGHUP, SIGQUIT) a one-line exit 128+N from the first import on."""

import os
import sys


def run() -> int:
    """Import and run the command line with the signal handlers in place first, so that a signal
    while the slow modules import gives ``windump: interrupted``, not a traceback.

    The package's own ``__init__`` imports nothing, so this covers every import of windump's.
    """
    try:
        from .frontends import signals

        signals.install("windump")
        from .frontends.cli import main

        return main()
    except KeyboardInterrupt as interrupt:  # while importing, or in main outside its own handler
        status, line = 130, "windump: interrupted"  # Python's own Ctrl-C, before the handlers
        handlers = sys.modules.get(f"{__package__}.frontends.signals")
        if handlers is not None:
            status, line = handlers.exit_status(interrupt), handlers.interrupted_line("windump", interrupt)
        try:
            if sys.stderr is not None:  # None: started with stderr closed
                print(line, file=sys.stderr)
        except OSError:  # stderr gone with the terminal
            pass
        return status


def forget_working_directory() -> None:
    """Take the working directory off ``sys.path``, where ``python -m`` puts it first: plugins come
    from installed distributions only, never from a ``.dist-info`` (or a module) planted where
    windump happens to run. ``python -P`` leaves it off already."""
    try:
        working = os.getcwd()
    except OSError:  # deleted meanwhile: python -m put "" there
        working = ""
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", working):
        del sys.path[0]


if __name__ == "__main__":
    forget_working_directory()
    raise SystemExit(run())
