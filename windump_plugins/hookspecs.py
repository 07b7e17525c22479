"""The windump plugin API: the hooks a plugin implements, and the records its implementations return.

A plugin is a module or object with functions marked ``@windump_plugins.hookimpl``, registered in
the ``windump`` entry-point group of its ``pyproject.toml``::

    [project.entry-points.windump]
    raw = "windump_raw.plugin"

windump's own sources, its published-header builder and its full-dump format are plugins registered
the very same way. The hooks are of two kinds:

*Who handles this?* (``firstresult``): windump asks the implementations in turn and the first that
returns something other than None wins: :func:`windump_open_location`, :func:`windump_open_file`.

*What do you offer?* (collecting): every implementation is asked and every answer is kept:
:func:`windump_source_kinds`, :func:`windump_dump_header`, :func:`windump_output_formats`.

Each call goes through pluggy (``pm.hook.NAME(...)``, ``pm`` being ``Plugins.manager``), so
``wrapper=True`` and ``hookwrapper=True`` implementations, ``tryfirst``/``trylast``, ``pm.trace`` and
``pm.add_hookcall_monitoring`` work as pluggy documents them; ``WINDUMP_TRACE_PLUGINS=1`` prints
every call and its result. Implementations are called last registered first, and take any subset of
a hook's arguments, by name: a hook may gain arguments without breaking a plugin.

Every implementation is guarded. Report an expected failure by raising
:class:`~windump_plugins.errors.WindumpError` with a one-line message: it reaches the user as it is.
Any other exception is your plugin's bug: it becomes a one-line ``plugin NAME failed: ...``
:class:`~windump_plugins.plugins.PluginError`, and so does a result of the wrong type. A failure ends
a *who handles this?* call; in a collecting call the other plugins' answers survive and the failure
is reported beside them (a wrapper sees only the answers).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

from .location import Option

if TYPE_CHECKING:
    import numpy as np

    from .formats.dumpheader import HeaderFormat
    from .paging import AddressSpace
    from .source import MemorySource

#: The pluggy project name: the prefix of the markers' attributes, and the entry-point group.
PROJECT = "windump"

#: Marks a function as the specification of a hook (windump's own use).
hookspec = pluggy.HookspecMarker(PROJECT)

#: Marks a plugin's function as the implementation of the hook it is named after.
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class SourceKind:
    """How a plugin's source is named on the command line, for help text and ``windump plugins``.

    ``pattern`` is what the user types (``"gdb://HOST:PORT"``, ``"FILE.elf"``); ``summary`` says
    in one line what it opens; ``options`` are the ``?NAME[=VALUE]`` options its location takes,
    which help, docs and gdb's ``windump-save`` are generated from.
    """

    pattern: str
    summary: str
    options: tuple[Option, ...] = ()


@dataclass(frozen=True, eq=False)
class HeaderCandidate:
    """A crash-dump header that one method built for a source, with what windump needs to write the
    dump around it.

    The arrays stay the method's: windump copies nothing, and freshens ``header`` in place for the
    moment of the dump (SystemTime, Comment, the processor count and context) once it is chosen.
    """

    #: The method's name, which orders the candidates: ``published`` (the header the guest's driver
    #: published through QEMU's vmcoreinfo device), ``symbols`` (built from the kernel's own data
    #: structures), or a plugin's own name (asked after those).
    method: str
    #: The header's layout (:data:`~windump_plugins.formats.dumpheader.X64`, later ``X86``).
    format: HeaderFormat
    #: The header, a 0-d array of ``format.dtype``, checked and patched as the method sees fit.
    header: np.ndarray
    #: ``(N, 2)`` uint64 ``[BasePage, PageCount]`` runs, sorted, inside the source's RAM: the pages
    #: the dump holds (the header's PhysicalMemoryBlock lists the same).
    runs: np.ndarray
    #: Virtual address of a plaintext KDDEBUGGER_DATA64 block (KDBG) in ``address_space``.
    kdbg_address: int
    #: The guest kernel's virtual memory, through the header's DirectoryTableBase.
    address_space: AddressSpace
    #: ``(physical address, bytes)`` the dump must hold in place of the guest's, such as a KDBG
    #: block the method decoded; written over the pages after the last one, as each vCPU's CONTEXT.
    overlays: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, eq=False)
class Layout:
    """Where an output format puts a dump's bytes in its file: ``header`` from offset 0, then the
    pages of ``pages`` back to back, range after range, and nothing else.

    ``pages`` is an ``(N, 2)`` uint64 array of ``[BasePage, PageCount]`` page ranges in file order;
    together they must hold every page of the dump's runs exactly once (windump checks). A full dump
    lists the runs themselves; a bitmap dump puts its sub-header and bitmap in ``header``.
    """

    #: Everything before the first page: the dump header, and what the format keeps after it.
    header: bytes
    #: ``(N, 2)`` ``[BasePage, PageCount]`` ranges, in the order the file holds their pages.
    pages: np.ndarray


class OutputFormat(abc.ABC):
    """A crash-dump file format: given the chosen header and its runs, where everything goes.

    windump writes through the :class:`Layout` it returns whether the pages are pulled from the
    source by address or pushed to the writer in any order, and applies its overlays (each vCPU's
    CONTEXT) after the last page.
    """

    #: What ``save(output_format=...)`` names the format by, e.g. ``full``.
    name: str
    #: One line for help text, e.g. ``every page of the runs, run after run (DumpType 1)``.
    summary: str

    @abc.abstractmethod
    def layout(self, header: np.ndarray, runs: np.ndarray) -> Layout:
        """The file layout of a dump of ``runs`` (``(N, 2)`` ``[BasePage, PageCount]``) under
        ``header`` (a 0-d array of its format's dtype, freshened for the moment of the dump; patch a
        copy, such as DumpType, into the bytes you return). Raise WindumpError when the header is
        not one this format can write."""


@hookspec(firstresult=True)
def windump_open_location(location: str) -> MemorySource | None:
    """Open ``location``, a ``SCHEME:REST`` string such as ``sample:`` or ``gdb://127.0.0.1:1234``.

    *Who handles this?* (``firstresult``) Return a :class:`~windump_plugins.source.MemorySource`
    when the scheme is yours, None otherwise; the first plugin that returns a source wins. Once you
    claim a location, report a failure to open it by raising
    :class:`~windump_plugins.errors.WindumpError` with a one-line message, not by returning None.
    """


@hookspec(firstresult=True)
def windump_open_file(path: str, head: bytes) -> MemorySource | None:
    """Open the regular file ``path`` if its content is a format you read.

    *Who handles this?* (``firstresult``) ``head`` holds the file's first bytes (up to 4096, fewer
    for a shorter file), so you can recognise a format by its magic without opening the file. Return
    None for content that is not yours; the first plugin that returns a source wins. Once you
    recognise the format, report damage by raising :class:`~windump_plugins.errors.WindumpError`
    (e.g. a truncated file).
    """


@hookspec
def windump_source_kinds() -> list[SourceKind] | None:
    """The sources this plugin opens, for ``windump save --help`` and ``windump plugins``.

    *Collecting* (not ``firstresult``): every plugin is asked and all the lists are shown, in call
    order; return an empty list (or None) when you open nothing the user names. Called whenever help
    is shown, so do no I/O here.
    """


@hookspec
def windump_dump_header(source: MemorySource) -> HeaderCandidate | None:
    """Build the crash-dump header of the guest in ``source``.

    *Collecting* (not ``firstresult``): every plugin is asked. windump takes one candidate, by
    :attr:`~HeaderCandidate.method` in its declared order (``published``, then ``symbols``, then the
    others in call order), and checks the others against it, warning where they disagree.

    Return None when your method does not apply to this source. When it should apply but cannot (the
    guest published no header, the kernel cannot be found), raise
    :class:`~windump_plugins.errors.WindumpError` saying why in one line: when no method succeeds,
    windump shows the most trusted one's message (a failure is ranked by its plugin's name, so name
    the plugin after its method). Only read from ``source``: never write guest memory, and keep the
    reads few, since a live guest may be paused meanwhile.
    """


@hookspec
def windump_output_formats() -> list[OutputFormat] | None:
    """The crash-dump file formats this plugin writes.

    *Collecting* (not ``firstresult``): every plugin is asked; windump looks formats up by
    :attr:`~OutputFormat.name` (the first offered wins, a second of the same name is warned about).
    Return an empty list (or None) when you offer none. Called before every dump, so do no I/O here.
    """
