"""``python -m windump_plugins``: the ``windump`` command line, Ctrl-C a one-line exit 130 from the first import on."""

import sys


def run() -> int:
    """Import and run the command line; Ctrl-C while importing gives ``windump: interrupted``, not a traceback.

    The package's own ``__init__`` imports almost nothing, so this covers the slow imports.
    """
    try:
        from .frontends.cli import EXIT_INTERRUPTED, PROG, main
    except KeyboardInterrupt:
        print("windump: interrupted", file=sys.stderr)
        return 130
    try:
        return main()
    except KeyboardInterrupt:  # in main before or after its own handler
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(run())
