"""windump: crash dumps that WinDbg opens, from the memory of QEMU/KVM Windows guests.

The package's top is the public plugin API (``from windump_plugins import hookimpl, MemorySource``):
each name is imported on first use, so ``import windump_plugins`` imports no numpy, and
``__version__`` too (importlib.metadata is slow to import): the command line installs its signal
handlers after this module runs and before anything slow imports, so Ctrl-C then gives one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module (under this package) that defines it.
_API = {
    "hookimpl": "hookspecs",
    "SourceKind": "hookspecs",
    "HeaderCandidate": "hookspecs",
    "Layout": "hookspecs",
    "OutputFormat": "hookspecs",
    "MemorySource": "source",
    "CpuState": "source",
    "Access": "source",
    "FileExtent": "source",
    "check_in_ram": "source",
    "FileMap": "filemap",
    "FileMapSource": "filemap",
    "scan_for_note": "notescan",
    "parse_note": "formats.vmcoreinfo",
    "AddressSpace": "paging",
    "PAGE_SIZE": "formats.dumpheader",
    "WindumpError": "errors",
    "SourceError": "errors",
    "FormatError": "errors",
    "TranslationError": "errors",
    "WindumpWarning": "errors",
    "PluginError": "plugins",
    "PluginWarning": "plugins",
    "Plugins": "plugins",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    __version__: str
    from .errors import FormatError as FormatError
    from .errors import SourceError as SourceError
    from .errors import TranslationError as TranslationError
    from .errors import WindumpError as WindumpError
    from .errors import WindumpWarning as WindumpWarning
    from .filemap import FileMap as FileMap
    from .filemap import FileMapSource as FileMapSource
    from .formats.dumpheader import PAGE_SIZE as PAGE_SIZE
    from .formats.vmcoreinfo import parse_note as parse_note
    from .hookspecs import HeaderCandidate as HeaderCandidate
    from .hookspecs import Layout as Layout
    from .hookspecs import OutputFormat as OutputFormat
    from .hookspecs import SourceKind as SourceKind
    from .hookspecs import hookimpl as hookimpl
    from .notescan import scan_for_note as scan_for_note
    from .paging import AddressSpace as AddressSpace
    from .plugins import PluginError as PluginError
    from .plugins import Plugins as Plugins
    from .plugins import PluginWarning as PluginWarning
    from .source import Access as Access
    from .source import CpuState as CpuState
    from .source import FileExtent as FileExtent
    from .source import MemorySource as MemorySource
    from .source import check_in_ram as check_in_ram


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use, and keep the name here."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("windump")
        except PackageNotFoundError:  # running from a checkout that was never installed
            found = "0+unknown"
        globals()["__version__"] = found
        return found
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


#: The names the package exports (tests check it lists exactly ``_API``).
__all__ = [
    "PAGE_SIZE",
    "Access",
    "AddressSpace",
    "CpuState",
    "FileExtent",
    "FileMap",
    "FileMapSource",
    "FormatError",
    "HeaderCandidate",
    "Layout",
    "MemorySource",
    "OutputFormat",
    "PluginError",
    "PluginWarning",
    "Plugins",
    "SourceError",
    "SourceKind",
    "TranslationError",
    "WindumpError",
    "WindumpWarning",
    "__version__",
    "check_in_ram",
    "hookimpl",
    "parse_note",
    "scan_for_note",
]
