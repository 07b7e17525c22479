"""Bad inputs for every parser windump has, each with the exact one-line error it must give.

``files`` builds damaged files (QEMU ELF dumps, their notes, the guest's VMCOREINFO note and dump
header, its physical-memory runs, crash dumps read back); ``wire`` holds hostile gdbstub (RSP)
replies and QMP conversations. Each case is generated from a sound input by one targeted change, so
the expected message follows from that change alone.
"""

from importlib.metadata import entry_points

#: The plugins windump ships, as ``tests/conftest.py`` selects them (importable from any test
#: directory, where ``conftest`` may name another directory's).
BUILT_IN_PLUGINS = ",".join(
    sorted(ep.name for ep in entry_points(group="windump") if ep.value.startswith("windump_plugins."))
)
