"""``-v`` for both front ends: windump's log records (which memory path ran, why, pauses, timings)
shown one line each, and the timings of a save's phases."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .reports import access_text

if TYPE_CHECKING:  # the save pipeline is imported only by the commands that save
    from ..save import SaveReport
    from ..writer import ProgressCallback

#: Every windump module logs under this logger (``logging.getLogger(__name__)``).
PACKAGE_LOGGER = "windump_plugins"

#: Log level by the number of ``-v``: warnings only, then info, then debug.
LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)

log = logging.getLogger(__name__)


def level(verbosity: int) -> int:
    return LEVELS[max(0, min(verbosity, len(LEVELS) - 1))]


class _Lines(logging.Handler):
    """Each record as ``PREFIX: LEVEL: message``, the way the front ends print warnings and errors."""

    def __init__(self, prefix: str, write: Callable[[str], None]) -> None:
        super().__init__()
        self.prefix, self.write = prefix, write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(f"{self.prefix}: {record.levelname.lower()}: {record.getMessage()}\n")
        except Exception:  # a broken record or stream must not end the dump (logging's own rule)
            self.handleError(record)


@contextmanager
def log_lines(prefix: str, write: Callable[[str], None], verbosity: int) -> Iterator[None]:
    """While the block runs, windump's records at ``level(verbosity)`` and above go to ``write``."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    handler = _Lines(prefix, write)
    handler.setLevel(level(verbosity))
    saved = logger.level
    logger.setLevel(level(verbosity))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


class SaveTimer:
    """A progress callback that notes when a save's body starts and ends, passing each report on to
    ``progress``; :meth:`log` then says how the source read the guest and how long the header, the
    body and the sync took.

    The writer reports once before the first byte and once after the last, so the header phase is
    everything before the first report (the published header, KDBG, processors) and the sync
    everything after the last (fsync and rename).
    """

    def __init__(self, progress: ProgressCallback | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.progress, self.clock = progress, clock
        self.started = clock()
        self.body_started: float | None = None
        self.body_ended: float | None = None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self.body_started is None:
            self.body_started = now
        if done >= total:
            self.body_ended = now
        if self.progress is not None:
            self.progress(done, total)

    def phases(self) -> dict[str, float]:
        """Seconds of each phase so far: ``header``, ``body``, ``sync``."""
        now = self.clock()
        body_started = now if self.body_started is None else self.body_started
        body_ended = now if self.body_ended is None else self.body_ended
        return {"header": body_started - self.started, "body": body_ended - body_started, "sync": now - body_ended}

    def log(self, report: SaveReport) -> None:
        """Log how the source read the guest (its Access) and how long each phase took."""
        if report.access is not None:
            log.info("%s: read %s", report.output, access_text(report.access))
        phases = self.phases()
        rate = report.bytes_written / phases["body"] / 1e6 if phases["body"] > 0 else float("inf")
        log.info("%s: header %.2f s, body %.2f s (%.0f MB/s), sync %.2f s", report.output, phases["header"],
                 phases["body"], rate, phases["sync"])
