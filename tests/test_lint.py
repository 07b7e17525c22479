"""The package passes ruff and mypy as pyproject.toml configures them: no finding is let through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gate import require

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "windump_plugins"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_ruff_reports_nothing():
    require("ruff")
    result = run("ruff", "check", "--no-cache", "--output-format", "concise", PACKAGE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_reports_nothing(tmp_path):
    require("mypy")
    result = run("mypy", "--cache-dir", str(tmp_path / "mypy-cache"), PACKAGE)
    assert result.returncode == 0, result.stdout + result.stderr
