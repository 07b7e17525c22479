"""What the benchmarks do around their measurements: work in a scratch directory that is always
removed, then print the figures as a table and as JSON, and write the JSON where ``--json`` says."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def in_scratch_directory(prefix: str, parent: Path | None, work: Callable[[Path], dict]) -> dict:
    """``work(directory)`` in a new directory under ``parent`` (created if missing; None: the
    system's temporary directory), removed afterwards, failures included."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        return work(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def publish(figures: dict, table: str, json_path: Path | None) -> None:
    print(table)
    print(json.dumps(figures, indent=2))
    if json_path:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")
