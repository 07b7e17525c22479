"""The one gate for what tests need from outside Python: :func:`require` skips a test whose tool is
missing, and fails it instead under ``WINDUMP_REQUIRE_QEMU=1`` (CI), where nothing may skip.

Test modules and helpers import it from here (``from gate import require``); ``conftest.py`` also
offers it as the ``require`` fixture and turns any other skip into a failure under CI. It is a
module of its own because pytest loads both ``conftest.py`` files of this tree under the one name
``conftest``, so a test cannot import either of them reliably.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import NoReturn

import pytest

#: The environment variable CI sets: every test must run, none may skip.
REQUIRE_ALL = "WINDUMP_REQUIRE_QEMU"

#: Each tool a test may need: a program on PATH, or a Python module (an extra of pyproject.toml).
PROGRAMS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "gdb": "gdb",
    "gcc": "gcc",
    "ld": "binutils",
    "objcopy": "binutils",
}
MODULES = {
    "kdmp-parser": "kdmp_parser",
    "volatility3": "volatility3",
    "memprocfs": "memprocfs",
    "sphinx": "sphinx",
    "ruff": "ruff",
    "mypy": "mypy",
}


def everything_required() -> bool:
    """True under CI (``WINDUMP_REQUIRE_QEMU=1``), where a missing tool fails its tests."""
    return os.environ.get(REQUIRE_ALL) == "1"


def missing(*tools: str) -> list[str]:
    """The tools of ``tools`` not on this machine; KeyError for a name this gate does not know."""
    absent = []
    for tool in tools:
        if tool in PROGRAMS:
            found = shutil.which(tool) is not None
        else:
            found = importlib.util.find_spec(MODULES[tool]) is not None
        if not found:
            absent.append(tool)
    return absent


def unavailable(what: str) -> NoReturn:
    """Skip the running test because ``what`` (a one-line reason) is missing here; fail it under CI."""
    if everything_required():
        pytest.fail(f"{what} ({REQUIRE_ALL}=1: nothing may skip)", pytrace=False)
    pytest.skip(what)


def require(*tools: str) -> None:
    """Skip the running test unless every tool of ``tools`` is here (see :data:`PROGRAMS` and
    :data:`MODULES`); under CI fail it instead."""
    absent = missing(*tools)
    if not absent:
        return
    hints = []
    for tool in absent:
        if tool in PROGRAMS:
            hints.append(f"{tool} is not on PATH (Debian package {PROGRAMS[tool]})")
        else:
            hints.append(f"Python module {MODULES[tool]} is not installed (pip install -e '.[test,docs]')")
    unavailable("; ".join(hints))
