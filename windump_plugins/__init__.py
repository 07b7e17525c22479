"""windump: crash dumps that WinDbg opens, from the memory of QEMU/KVM Windows guests."""


def __getattr__(name: str):
    """``__version__`` and ``windump_plugins.hookimpl`` (for plugins), imported on first use: the
    command line installs its signal handlers after this module runs and before anything slow
    (importlib.metadata, numpy) imports, so that Ctrl-C then gives one line, not a traceback."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("windump")
        except PackageNotFoundError:  # running from a checkout that was never installed
            found = "0+unknown"
        globals()["__version__"] = found
        return found
    if name == "hookimpl":
        from .hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "hookimpl"]
