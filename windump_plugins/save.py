"""The save pipeline every front end calls: the guest's prepared dump header, refreshed for the
moment of the dump, then every page of its runs with each vCPU's CONTEXT overlaid, into one
crash-dump file."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

from .errors import WindumpError
from .formats.dumpheader import header_bytes
from .fresh import freshen_header
from .errors import WindumpWarning
from .headers.published import prepare_header
from .formats.kdbg import KDDEBUGGER_DATA64
from .processors import context_overlays, find_processors
from .source import Access, MemorySource
from .writer import ProgressCallback, write_dump

NO_CPU_STATE_MESSAGE = (
    "{source} gives no vCPU registers: no processor CONTEXT is written, so WinDbg shows the contexts "
    "the guest saved itself (often 'Only x86 user-mode context is available')"
)


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
    #: Windows processors whose CONTEXT holds its vCPU's registers.
    contexts: int = 0
    #: How the source read guest memory, taken once its reads were done.
    access: Access | None = None

    @property
    def bytes_per_second(self) -> float:
        return self.bytes_written / self.seconds if self.seconds > 0 else float("inf")


def save(
    source: MemorySource,
    output: str | os.PathLike,
    *,
    force: bool = False,
    progress: ProgressCallback | None = None,
    context_cpu: int | None = None,
) -> SaveReport:
    """Write the crash dump of ``source`` to ``output`` (replaced only with ``force``).

    The header's ContextRecord and exception record show vCPU ``context_cpu`` (an index into
    ``source.cpus()``; None: the first). Every processor's CONTEXT holds its vCPU's registers in
    the dump; guest memory is never written. The caller owns ``source`` and closes it. Raises
    WindumpError when the guest published no usable header, ``context_cpu`` names no vCPU, or the
    file cannot be written; ``output`` is then left as it was.
    """
    started = time.perf_counter()
    prepared = prepare_header(source)
    header, space = prepared.header, prepared.address_space
    cpus = source.cpus()
    name = source.description or "the source"
    if context_cpu is not None and not 0 <= context_cpu < len(cpus):
        held = f"vCPUs 0-{len(cpus) - 1}" if cpus else "no vCPU registers"
        raise WindumpError(f"the header context cannot show vCPU {context_cpu}: {name} has {held}")

    overlays, number_processors, context_registers, contexts = [], None, None, 0
    if cpus:
        kdbg = space.read_struct(prepared.kdbg_address, KDDEBUGGER_DATA64)
        found = find_processors(cpus, space, kdbg, int(header["NumberProcessors"]))
        overlays = context_overlays(space, found.processors)
        number_processors, contexts = len(found.kprcbs), len(found.processors)
        context_registers = cpus[context_cpu or 0].registers
    else:
        warnings.warn(NO_CPU_STATE_MESSAGE.format(source=name), WindumpWarning, stacklevel=2)
    freshen_header(header, space, description=source.description, number_processors=number_processors,
                   context_registers=context_registers)

    written = write_dump(output, header_bytes(header), prepared.runs, source, force=force, progress=progress,
                         overlays=overlays)
    return SaveReport(
        output=os.fspath(output),
        bytes_written=written,
        runs=len(prepared.runs),
        pages=int(prepared.runs[:, 1].sum()) if len(prepared.runs) else 0,
        seconds=time.perf_counter() - started,
        format=prepared.format.name,
        contexts=contexts,
        access=source.access(),
    )
