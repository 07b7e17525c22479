"""``python -m windump_plugins``: the ``windump`` command line."""

from .cli import main

raise SystemExit(main())
