"""The save pipeline every front end calls: the guest's prepared dump header, then every page of its
runs, into one crash-dump file."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .format import header_bytes
from .header import prepare_header
from .source import MemorySource
from .writer import ProgressCallback, write_dump


@dataclass(frozen=True)
class SaveReport:
    """What :func:`save` wrote, for the front end's summary line."""

    output: str
    bytes_written: int
    runs: int
    pages: int
    seconds: float
    #: The dump header's format name (``x64`` or ``x86``).
    format: str

    @property
    def bytes_per_second(self) -> float:
        return self.bytes_written / self.seconds if self.seconds > 0 else float("inf")


def save(
    source: MemorySource,
    output: str | os.PathLike,
    *,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> SaveReport:
    """Write the crash dump of ``source`` to ``output`` (replaced only with ``force``).

    The caller owns ``source`` and closes it. Raises WindumpError when the guest published no
    usable header or the file cannot be written; ``output`` is then left as it was.
    """
    started = time.perf_counter()
    prepared = prepare_header(source)
    written = write_dump(output, header_bytes(prepared.header), prepared.runs, source, force=force, progress=progress)
    return SaveReport(
        output=os.fspath(output),
        bytes_written=written,
        runs=len(prepared.runs),
        pages=int(prepared.runs[:, 1].sum()) if len(prepared.runs) else 0,
        seconds=time.perf_counter() - started,
        format=prepared.format.name,
    )
