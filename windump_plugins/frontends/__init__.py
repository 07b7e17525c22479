"""The front ends: the ``windump`` command line and ``windump-save`` inside gdb. Both are thin: they
parse what the user typed, call :func:`windump_plugins.save.save` and print one line per error."""
