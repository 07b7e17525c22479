"""windump for gdb: ``source`` this file in a gdb attached to QEMU's gdbstub to get ``windump-save``.

    (gdb) target remote 127.0.0.1:1234
    (gdb) source /path/to/gdb/windump.py        # `windump gdb-script` prints the installed copy's path
    (gdb) windump-save guest.dmp

gdb embeds its own Python, not the virtualenv's: the package is imported from gdb's Python, from
the virtualenv named by VIRTUAL_ENV (its site-packages added as pwndbg's gdbinit does, so
editable installs work), or from the checkout holding this file. The work happens in
``windump_plugins.frontends.gdb``; this file only loads it and registers the command and the
settings declared there, with the help text its parser gives.
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
            from windump_plugins.frontends import gdb as frontend
            from windump_plugins.errors import WindumpError
            return (frontend, WindumpError), None
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
    """Settings of windump-save (see help windump-save)."""

    def __init__(self, name):
        super().__init__(name, gdb.COMMAND_FILES, gdb.COMPLETE_NONE, True)


class _WindumpShow(_WindumpPrefix):
    """Show the settings of windump-save."""

    def __init__(self, settings):
        super().__init__("show windump")
        self._settings = settings

    def invoke(self, argument, from_tty):
        for setting in self._settings:
            gdb.execute(f"show windump {setting.name}")


class _WindumpSetting(gdb.Parameter):
    """A windump-save default; the command's options override it."""

    def __init__(self, setting):
        self.set_doc = f"Set whether windump-save should {setting.doc}."
        self.show_doc = f"Show whether windump-save should {setting.doc}."
        self.__doc__ = f"When on, windump-save will {setting.doc}."
        self._show = f"Whether windump-save should {setting.doc}"
        super().__init__(f"windump {setting.name}", gdb.COMMAND_FILES, gdb.PARAM_BOOLEAN)
        self.value = setting.default

    def get_show_string(self, value):
        return f"{self._show} is {value}."


class WindumpSave(gdb.Command):
    """Write a Windows crash dump of the QEMU guest gdb is attached to."""

    def __init__(self, frontend, error_class):
        self.__doc__ = frontend.save_help()  # the one parser's help, read by gdb when registering
        super().__init__("windump-save", gdb.COMMAND_FILES, gdb.COMPLETE_FILENAME)
        self._frontend, self._error_class = frontend, error_class

    def invoke(self, argument, from_tty):
        self.dont_repeat()
        settings = self._frontend.Settings(**{setting.keyword: gdb.parameter(f"windump {setting.name}")
                                               for setting in self._frontend.SETTINGS})

        def write(text):
            gdb.write(text)
            gdb.flush()

        try:
            line = self._frontend.save_in_gdb(gdb.string_to_argv(argument), settings, write=write,
                                               terminal=os.isatty(1))
        except self._error_class as error:
            raise gdb.GdbError(f"windump-save: {error}") from None
        except KeyboardInterrupt as interrupt:  # Ctrl-C, SIGTERM, SIGHUP or SIGQUIT
            from windump_plugins.frontends.signals import interrupted_line

            line = interrupted_line("windump-save", interrupt)
            raise gdb.GdbError(f"{line}: no dump written, PhyMemMode restored") from None
        if line:
            gdb.write(line + "\n")


def _windump_register():
    loaded, problem = _windump_import()
    if loaded is None:
        gdb.write(problem + "\n", gdb.STDERR)
        return
    _WindumpPrefix("set windump")
    _WindumpShow(loaded[0].SETTINGS)
    for setting in loaded[0].SETTINGS:
        _WindumpSetting(setting)
    WindumpSave(*loaded)


_windump_register()
