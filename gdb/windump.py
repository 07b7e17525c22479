"""windump for gdb: ``source`` this file in a gdb attached to QEMU's gdbstub to get ``windump-save``.

    (gdb) target remote 127.0.0.1:1234
    (gdb) source /path/to/gdb/windump.py        # `windump gdb-script` prints the installed copy's path
    (gdb) windump-save guest.dmp

gdb embeds its own Python, not the virtualenv's: the package is imported from gdb's Python, from
the virtualenv named by VIRTUAL_ENV (its site-packages added as pwndbg's gdbinit does, so
editable installs work), or from the checkout holding this file. The work happens in
``windump_plugins.frontends.gdb``; this file only loads it and declares the command and settings.
"""

import os
import site
import sys
from pathlib import Path

import gdb

_WINDUMP_SCRIPT = Path(__file__).resolve()


def _windump_venv_site_packages():
    """Put the site-packages of $VIRTUAL_ENV first on gdb's sys.path (with its .pth hooks), or
    return why it cannot serve gdb's Python."""
    venv = os.environ.get("VIRTUAL_ENV")
    if not venv:
        return None
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    packages = Path(venv) / "lib" / version / "site-packages"
    if not packages.is_dir():
        return f"VIRTUAL_ENV={venv} has no lib/{version}/site-packages for gdb's Python {sys.version.split()[0]}"
    if str(packages) not in sys.path:
        sys.path.insert(0, str(packages))
    site.addsitedir(str(packages))  # runs .pth files: editable installs hook imports there
    return None


def _windump_import():
    """``windump_plugins.frontends.gdb`` and its error class, or None and a one-line reason."""
    problem = _windump_venv_site_packages()
    # A checkout keeps the package beside gdb/; an installed copy lives inside the package.
    for root in (None, _WINDUMP_SCRIPT.parents[1], _WINDUMP_SCRIPT.parents[2]):
        if root is not None:
            if not (root / "windump_plugins" / "__init__.py").is_file():
                continue
            sys.path.insert(0, str(root))
        try:
            from windump_plugins.frontends import gdb as gdbscript
            from windump_plugins.errors import WindumpError
            return (gdbscript, WindumpError), None
        except ImportError as error:
            if getattr(error, "name", "") not in ("windump_plugins", "windump_plugins.frontends.gdb"):
                problem = problem or f"{error}"
                break
            problem = problem or "no windump_plugins package"
            if root is not None:
                sys.path.remove(str(root))
    where = f"gdb's Python {sys.version.split()[0]} ({sys.executable or 'embedded'})"
    return None, (f"windump: windump-save not loaded: {problem}; install windump for {where} "
                  f"or set VIRTUAL_ENV to a Python {sys.version_info.major}.{sys.version_info.minor} virtualenv that has it")


class _WindumpPrefix(gdb.Command):
    """Settings of windump-save: force, packets-only, progress."""

    def __init__(self, name):
        super().__init__(name, gdb.COMMAND_FILES, gdb.COMPLETE_NONE, True)


class _WindumpSetting(gdb.Parameter):
    """A windump-save default; the command's options override it."""

    def __init__(self, name, default, set_doc, show_doc):
        self.set_doc, self.show_doc = set_doc, show_doc
        super().__init__(f"windump {name}", gdb.COMMAND_FILES, gdb.PARAM_BOOLEAN)
        self.value = default

    def get_show_string(self, value):
        return f"{self.show_doc} is {value}."


class WindumpSave(gdb.Command):
    """Write a Windows crash dump of the QEMU guest gdb is attached to.
Usage: windump-save [-f|--force] [--packets-only] [--header-pa ADDR] [-q|--quiet] FILE

Writes a full Windows crash dump (PAGEDU64) of the guest behind QEMU's gdbstub to FILE, using
the dump header the guest's driver published (found in RAM, or at --header-pa ADDR). FILE
appears only once complete. The guest stays stopped: windump never resumes it. The vCPU
selected in gdb (thread N = vCPU N-1) gives the header's context.

RAM is read from QEMU's process memory when QEMU runs on this host and we may read it, else
through the stub in physical-memory mode (restored afterwards, on errors and Ctrl-C too).

  -f, --force        replace FILE if it exists (default: set windump force)
  --packets-only     read RAM through the stub even on QEMU's host (set windump packets-only)
  --header-pa ADDR   physical address of the published VMCOREINFO note or its dump header
  -q, --quiet        no progress line and no summary
Progress is drawn on a terminal unless "set windump progress off".

Examples:
  windump-save guest.dmp
  thread 2
  windump-save --force --packets-only /tmp/guest.dmp
  windump-save --header-pa 0x7fe000 guest.dmp"""

    def __init__(self, gdbscript, error_class):
        super().__init__("windump-save", gdb.COMMAND_FILES, gdb.COMPLETE_FILENAME)
        self._gdbscript, self._error_class = gdbscript, error_class

    def invoke(self, argument, from_tty):
        self.dont_repeat()
        settings = self._gdbscript.Settings(
            force=gdb.parameter("windump force"),
            packets_only=gdb.parameter("windump packets-only"),
            progress=gdb.parameter("windump progress"),
        )

        def write(text):
            gdb.write(text)
            gdb.flush()

        try:
            line = self._gdbscript.save_in_gdb(gdb.string_to_argv(argument), settings, write=write,
                                               terminal=os.isatty(1))
        except self._error_class as error:
            raise gdb.GdbError(f"windump-save: {error}") from None
        except KeyboardInterrupt:
            raise gdb.GdbError("windump-save: interrupted: no dump written, PhyMemMode restored") from None
        if line:
            gdb.write(line + "\n")


def _windump_register():
    loaded, problem = _windump_import()
    if loaded is None:
        gdb.write(problem + "\n", gdb.STDERR)
        return
    _WindumpPrefix("set windump")
    _WindumpPrefix("show windump")
    _WindumpSetting("force", False, "Set whether windump-save replaces an existing file.",
                    "Whether windump-save replaces an existing file")
    _WindumpSetting("packets-only", False, "Set whether windump-save reads RAM only through the stub.",
                    "Whether windump-save reads RAM only through the stub")
    _WindumpSetting("progress", True, "Set whether windump-save draws a progress line on a terminal.",
                    "Whether windump-save draws a progress line")
    WindumpSave(*loaded)


_windump_register()
