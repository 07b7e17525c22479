"""Progress for the terminal: a tqdm bar on stderr turned into the writer's ``progress(done, total)``
callback, or nothing at all when stderr is not a terminal; and lines written above the bar."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

from ..writer import ProgressCallback


@contextmanager
def progress_bar(description: str, *, enabled: bool = True,
                 stream: TextIO | None = None) -> Iterator[ProgressCallback | None]:
    """A byte-counting bar (size, rate, time left) for the duration of the ``with`` block.

    Yields None, so the writer skips reporting, unless ``enabled`` and ``stream`` (default stderr)
    is a terminal: logs and pipes get no carriage-return noise. The bar is cleared at the end so a
    summary line can take its place.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled or not stream.isatty():
        yield None
        return
    with tqdm(desc=description, unit="B", unit_scale=True, unit_divisor=1024, file=stream, leave=False,
              dynamic_ncols=True) as bar:

        def progress(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)
            if done == total:
                bar.refresh()  # tqdm skips redraws within 0.1 s; the last state is worth showing

        yield progress


def write_above(text: str, stream: TextIO | None = None) -> None:
    """Write ``text`` (whole lines) to ``stream`` (default stderr) above any bar, which tqdm redraws."""
    tqdm.write(text, file=sys.stderr if stream is None else stream, end="")
