"""windump: crash dumps that WinDbg opens, from the memory of QEMU/KVM Windows guests."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("windump")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    """``windump_plugins.hookimpl`` for plugins, imported on first use so that starting the
    command line imports no numpy before its Ctrl-C handling is in place."""
    if name == "hookimpl":
        from .hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "hookimpl"]
