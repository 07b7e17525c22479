"""The ``full`` output format, windump's built-in: a complete memory dump (DumpType 1) as QEMU's
``dump-guest-memory -w`` writes it, the dump header then every page of the runs, run after run."""

from __future__ import annotations

import numpy as np

from ..errors import WindumpError
from ..formats.dumpheader import X64, X86, header_bytes
from ..hookspecs import Layout, OutputFormat, hookimpl


def full_layout(header: bytes, runs: np.ndarray) -> Layout:
    """``header`` (the dump header's bytes, as the guest's format sizes them) then the pages of
    ``runs`` in run order."""
    if len(header) not in (X64.size, X86.size):
        raise WindumpError(f"dump header is {len(header):#x} bytes, expected {X64.size:#x} or {X86.size:#x}")
    return Layout(bytes(header), np.asarray(runs, dtype=np.uint64).reshape(-1, 2))


class FullDump(OutputFormat):
    """Every page of the runs, in run order, right after the header as it is."""

    name = "full"
    summary = "the header, then every page of the runs, run after run (DumpType 1, as QEMU writes it)"

    def layout(self, header: np.ndarray, runs: np.ndarray) -> Layout:
        return full_layout(header_bytes(header), runs)


@hookimpl
def windump_output_formats() -> list[OutputFormat]:
    return [FullDump()]
