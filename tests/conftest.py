"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

#: The plugins windump itself ships: tests run with these alone, whatever else is installed.
BUILT_IN_PLUGINS = ",".join(
    sorted(ep.name for ep in entry_points(group="windump") if ep.value.startswith("windump_plugins."))
)


@pytest.fixture
def run_windump(tmp_path):
    """Run ``python -m windump_plugins ARGS`` in ``tmp_path`` with only the built-in plugins, as a
    user would run ``windump``; returns the CompletedProcess (text mode)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        environ = {key: value for key, value in os.environ.items() if not key.startswith("WINDUMP_")}
        environ["WINDUMP_PLUGINS"] = BUILT_IN_PLUGINS
        environ.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "windump_plugins", *args],
            cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    return run
