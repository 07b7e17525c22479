"""The save pipeline every front end calls: the dump header the plugins build for the guest, refreshed
for the moment of the dump, then every page of its runs with each vCPU's CONTEXT overlaid, into one
crash-dump file laid out by an output format.

Data flows one way: the writer only reads the source; :func:`save` tells the source when its reads
are done (so a live guest resumes before the file is synced) and picks the writeback the source's
declaration asks for.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import WindumpError, WindumpWarning
from .formats.kdbg import KDDEBUGGER_DATA64
from .fresh import freshen_header
from .headers.choice import choose_header
from .hookcalls import PluginError, blame
from .hookspecs import Layout, OutputFormat
from .plugins import Plugins, load_plugins
from .processors import context_overlays, find_processors
from .source import Access, MemorySource
from .writer import DumpWriter, ProgressCallback, Writeback

logger = logging.getLogger(__name__)

#: The output format a dump has unless the caller names another.
DEFAULT_FORMAT = "full"

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
    #: The method that built the dump header (``published`` ...).
    header: str = ""
    #: The output format that laid out the file (``full`` ...).
    output_format: str = DEFAULT_FORMAT

    @property
    def bytes_per_second(self) -> float:
        return self.bytes_written / self.seconds if self.seconds > 0 else float("inf")


def writeback_for(source: MemorySource) -> Writeback:
    """Writeback at the final fsync for a source that keeps a guest paused while it is read (its
    reads stay as short as they can), chunk by chunk for every other."""
    return Writeback.AT_COMMIT if source.resumes_after_reading else Writeback.EAGER


def save(
    source: MemorySource,
    output: str | os.PathLike,
    *,
    plugins: Plugins | None = None,
    output_format: str = DEFAULT_FORMAT,
    force: bool = False,
    progress: ProgressCallback | None = None,
    context_cpu: int | None = None,
) -> SaveReport:
    """Write the crash dump of ``source`` to ``output`` (replaced only with ``force``).

    ``plugins`` build the header and lay out the file (None: windump's core plugins only, the
    published header and the full dump, loaded here; a caller that keeps a live guest paused loads
    them before it opens the source, as the front ends do); ``output_format`` names the layout. The header's
    ContextRecord and exception record show vCPU ``context_cpu`` (an index into ``source.cpus()``;
    None: the first). Every processor's CONTEXT holds its vCPU's registers in the dump; guest memory
    is never written. The caller owns ``source`` and closes it. Raises WindumpError when no header
    can be built, ``context_cpu`` names no vCPU, or the file cannot be written; ``output`` is then
    left as it was.
    """
    started = time.perf_counter()
    if plugins is None:
        plugins = load_plugins(core_only=True)
    layout_format = _output_format(plugins, output_format)
    name = source.description or "the source"
    prepared = choose_header(*plugins.header_candidates(source), source=name)
    header, space = prepared.header, prepared.address_space
    cpus = source.cpus()
    if context_cpu is not None and not 0 <= context_cpu < len(cpus):
        held = f"vCPUs 0-{len(cpus) - 1}" if cpus else "no vCPU registers"
        raise WindumpError(f"the header context cannot show vCPU {context_cpu}: {name} has {held}")

    overlays, number_processors, context_registers, contexts = list(prepared.overlays), None, None, 0
    if cpus:
        kdbg = space.read_struct(prepared.kdbg_address, KDDEBUGGER_DATA64)
        found = find_processors(cpus, space, kdbg, int(header["NumberProcessors"]))
        overlays += context_overlays(space, found.processors)
        number_processors, contexts = len(found.kprcbs), len(found.processors)
        context_registers = cpus[context_cpu or 0].registers
    else:
        warnings.warn(NO_CPU_STATE_MESSAGE.format(source=name), WindumpWarning, stacklevel=2)
    freshen_header(header, space, description=source.description, number_processors=number_processors,
                   context_registers=context_registers)

    layout = _layout(layout_format, header, prepared.runs)
    with DumpWriter(output, layout, prepared.runs, overlays=overlays, force=force, progress=progress,
                    writeback=writeback_for(source)) as dump:
        dump.pull(source)
        source.reading_done()
        written = dump.commit()
    logger.info("wrote %s: header from %s, %s layout, %d bytes", os.fspath(output), prepared.method,
                layout_format.name, written)
    return SaveReport(
        output=os.fspath(output),
        bytes_written=written,
        runs=len(prepared.runs),
        pages=int(prepared.runs[:, 1].sum()) if len(prepared.runs) else 0,
        seconds=time.perf_counter() - started,
        format=prepared.format.name,
        contexts=contexts,
        access=source.access(),
        header=prepared.method,
        output_format=layout_format.name,
    )


def _output_format(plugins: Plugins, name: str) -> OutputFormat:
    formats = plugins.output_formats()
    if name not in formats:
        offered = ", ".join(sorted(formats)) or "none (see windump plugins)"
        raise WindumpError(f"no plugin writes the output format {name!r}; the formats offered: {offered}")
    return formats[name]


def _layout(output_format: OutputFormat, header: np.ndarray, runs: np.ndarray) -> Layout:
    """The format's layout of the dump; its unexpected exceptions and wrong answers are its plugin's fault."""
    owner = f"output format {output_format.name}"
    try:
        layout = output_format.layout(header, runs)
    except WindumpError:
        raise
    except Exception as exc:
        raise blame(owner, exc) from exc
    if not isinstance(layout, Layout):
        raise PluginError(f"{owner} failed: layout returned {type(layout).__name__}, not a Layout")
    return layout
