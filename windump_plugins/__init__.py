"""windump: crash dumps that WinDbg opens, from the memory of QEMU/KVM Windows guests."""

from importlib.metadata import PackageNotFoundError, version

from .hookspecs import hookimpl

try:
    __version__ = version("windump")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "hookimpl"]
