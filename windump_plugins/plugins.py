"""The plugin manager: loads the ``windump`` entry points into pluggy and is the only way the rest
of windump asks the plugins anything.

Hooks are called through pluggy (``manager.hook.NAME(...)``), so wrappers, ``manager.trace`` and
hook-call monitoring see every call. A plugin that fails to import or implements a misspelled hook is
skipped with a warning; each implementation is guarded as its plugin registers (:mod:`.hookcalls`):
one that raises is named in a one-line PluginError, and in a collecting hook the other plugins'
answers survive it. ``WINDUMP_TRACE_PLUGINS=1`` prints each hook call and its result to stderr.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import SourceError, WindumpError
from .hookcalls import (
    HookFailure,
    HookGuard,
    PluginError,
    reason,
    trace_call,
    trace_result,
)
from .hookspecs import PROJECT, HeaderCandidate, OutputFormat, SourceKind
from .source import MemorySource

#: Entry-point group that built-in and third-party plugins register in.
ENTRY_POINT_GROUP = "windump"

#: Comma list of entry-point names: when set, only these plugins load (datasette's
#: ``DATASETTE_LOAD_PLUGINS``) beside the core plugins; set but empty loads only those.
ONLY_VARIABLE = "WINDUMP_PLUGINS"

#: Comma list of entry-point names that never load (core plugins included).
DISABLE_VARIABLE = "WINDUMP_DISABLE_PLUGINS"

#: Set (to anything but empty or ``0``): print every hook call and its result to stderr, as
#: datasette's ``DATASETTE_TRACE_PLUGINS`` does.
TRACE_VARIABLE = "WINDUMP_TRACE_PLUGINS"

#: windump's own header and output-format plugins, by entry-point name: every dump needs them, so
#: they load whatever ``WINDUMP_PLUGINS`` names; only ``WINDUMP_DISABLE_PLUGINS`` skips them.
CORE_PLUGINS = ("published", "full")

#: What a location looks like (``sample:``, ``gdb://host:1234``): an RFC 3986 scheme and a colon.
LOCATION = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

#: Bytes of a file's start that ``windump_open_file`` sees.
HEAD_SIZE = 4096

#: What a SOURCE path may name besides a regular file, and what it must not: reading a FIFO's,
#: a terminal's or a socket's head waits for a writer for ever, or fails with "Illegal seek".
#: A block device may hold a dump image, and its reads come from a disk, not from a peer.
_NOT_DUMPS = ((stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
              (stat.S_ISSOCK, "a socket"))


class PluginWarning(UserWarning):
    """A plugin was skipped (it failed to import, to register, or implements an unknown hook), or one
    implementation of a collecting hook failed while the others answered."""


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin as ``windump plugins`` lists it; ``dist`` and ``version`` are None for a
    plugin registered in-process (tests) rather than installed."""

    name: str
    dist: str | None
    version: str | None
    module: str
    kinds: tuple[SourceKind, ...]
    #: The hooks it implements, by name.
    hooks: tuple[str, ...] = ()


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


def _names(environ: Mapping[str, str], variable: str) -> set[str] | None:
    value = environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _is_builtin(entry_point: EntryPoint) -> bool:
    """windump's own plugins: a third-party entry point of the same name never displaces one."""
    return entry_point.value.startswith("windump_plugins.")


def _is_core(entry_point: EntryPoint) -> bool:
    return entry_point.name in CORE_PLUGINS and _is_builtin(entry_point)


def _origin(entry_point: EntryPoint) -> str:
    """``DIST VERSION`` of the distribution that registers ``entry_point``, for warnings."""
    dist = entry_point.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


def load_plugins(
    environ: Mapping[str, str] = os.environ,
    warn: Callable[[str], None] = _warn,
    *,
    core_only: bool = False,
) -> Plugins:
    """Load every ``windump`` entry point that ``WINDUMP_PLUGINS`` / ``WINDUMP_DISABLE_PLUGINS``
    allow (with ``core_only``, only the :data:`CORE_PLUGINS` among them), each on its own: one that
    fails is reported through ``warn`` and skipped, and so is one named like a built-in plugin (its
    value outside ``windump_plugins``): the built-in keeps its name. ``WINDUMP_TRACE_PLUGINS`` turns
    tracing on.

    ``warn`` gets a one-line message; the default issues a :class:`PluginWarning`.
    """
    plugins = Plugins(warn, trace=environ.get(TRACE_VARIABLE, "") not in ("", "0"))
    only = _names(environ, ONLY_VARIABLE)
    disabled = _names(environ, DISABLE_VARIABLE) or set()
    found = list(entry_points(group=ENTRY_POINT_GROUP))
    builtins: dict[str, EntryPoint] = {}
    for entry_point in found:
        if _is_builtin(entry_point):
            builtins.setdefault(entry_point.name, entry_point)
    for entry_point in found:
        wanted = _is_core(entry_point) or (not core_only and (only is None or entry_point.name in only))
        if not wanted or entry_point.name in disabled:
            continue
        builtin = builtins.get(entry_point.name)
        if builtin is not None and entry_point is not builtin:
            warn(f"plugin {entry_point.name} ({_origin(entry_point)}) skipped: windump's built-in plugin "
                 f"{entry_point.name} ({_origin(builtin)}) has that name and keeps it")
            continue
        plugins.load_entry_point(entry_point)
    if not core_only:
        for name in sorted((only or set()) - {entry_point.name for entry_point in found}):
            warn(f"{ONLY_VARIABLE} names plugin {name}, but no installed plugin has that name")
    plugins.check_pending()
    return plugins


def _refuse_non_dump(spec: str, mode: int) -> None:
    for test, what in _NOT_DUMPS:
        if test(mode):
            raise SourceError(f"{spec} is {what}, not a file: expected a QEMU ELF dump file or SCHEME:...")


class Plugins:
    """A typed facade over pluggy's PluginManager: the calls windump makes, each guarded.

    ``manager`` is the pluggy PluginManager itself, for ``manager.trace``,
    ``manager.add_hookcall_monitoring`` and direct ``manager.hook`` calls; windump's own code calls the
    methods here. With ``trace``, every hook call and its result is printed to stderr.
    """

    def __init__(self, warn: Callable[[str], None] = _warn, *, trace: bool = False):
        self.manager = pluggy.PluginManager(PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self._warn = warn
        #: Entry point name -> (distribution name, version) for installed plugins.
        self._origins: dict[str, tuple[str | None, str | None]] = {}
        #: Plugin name -> the plugin as written (the manager holds its guarded stand-in).
        self._plugins: dict[str, object] = {}
        self._guard = HookGuard()
        if trace:
            self.manager.add_hookcall_monitoring(trace_call, trace_result)

    # -- registration ---------------------------------------------------------------------------

    def load_entry_point(self, entry_point: EntryPoint) -> None:
        """Import and register one entry point; a failure becomes a warning naming the plugin."""
        dist = entry_point.dist
        origin = (dist.name, dist.version) if dist is not None else (None, None)
        try:
            self._register(entry_point.load(), entry_point.name)
        except Exception as exc:  # a broken plugin must not stop windump: say so and go on
            self._warn(f"plugin {entry_point.name} ({_origin(entry_point)}) failed to load: {reason(exc)}")
            return
        self._origins[entry_point.name] = origin

    def register(self, plugin: object, name: str) -> None:
        """Register an in-process plugin (a module, class or object with hook implementations)."""
        self._register(plugin, name)
        self.check_pending()

    def unregister(self, name: str) -> None:
        """Remove the plugin registered as ``name``."""
        self.manager.unregister(name=name)
        self._plugins.pop(name, None)
        self._origins.pop(name, None)

    def check_pending(self) -> None:
        """Unregister, with a warning, every plugin that implements a hook windump does not have
        (a misspelled name would otherwise be silently never called)."""
        while True:
            try:
                self.manager.check_pending()
            except pluggy.PluginValidationError as exc:
                name = self.manager.get_name(exc.plugin) or repr(exc.plugin)
                self._warn(f"plugin {name} skipped: {exc}")
                self.unregister(name)
            else:
                return

    def names(self) -> list[str]:
        """The registered plugins' names, sorted."""
        return sorted(name for name, _ in self.manager.list_name_plugin())

    def _register(self, plugin: object, name: str) -> None:
        self.manager.register(self._guard.stand_in(self.manager, plugin, name), name=name)
        self._plugins[name] = plugin

    # -- hook calls -----------------------------------------------------------------------------

    def _warn_failures(self, failures: Sequence[HookFailure]) -> None:
        for failure in failures:
            self._warn(str(failure.error))

    def _kinds_of(self, hook: Callable[..., list[Any]]) -> list[SourceKind]:
        try:
            answers, failures = self._guard.collect(hook)
        except WindumpError as error:  # a hook wrapper failed: help text goes on without kinds
            answers, failures = [], [HookFailure("", error)]
        self._warn_failures(failures)
        return [kind for kinds in answers for kind in kinds]

    def kinds(self) -> list[SourceKind]:
        """Every source kind the plugins open, in call order, for help text and errors."""
        return self._kinds_of(self.manager.hook.windump_source_kinds)

    def describe(self) -> list[PluginInfo]:
        """Each registered plugin with its distribution, version, module, source kinds and hooks, by name."""
        described = []
        everyone = dict(self.manager.list_name_plugin())
        for name, stand_in in everyone.items():
            others = [plugin for other, plugin in everyone.items() if other != name]
            kinds = self._kinds_of(self.manager.subset_hook_caller("windump_source_kinds", others))
            dist, version = self._origins.get(name, (None, None))
            plugin = self._plugins.get(name, stand_in)
            module = getattr(plugin, "__name__", None) or type(plugin).__module__
            hooks = tuple(sorted(caller.name for caller in self.manager.get_hookcallers(stand_in) or ()))
            described.append(PluginInfo(name, dist, version, module, tuple(kinds), hooks))
        return sorted(described, key=lambda info: info.name)

    def header_candidates(self, source: MemorySource) -> tuple[list[HeaderCandidate], list[HookFailure]]:
        """Every plugin's dump header for ``source``, in call order, and the implementations that failed."""
        return self._guard.collect(self.manager.hook.windump_dump_header, source=source)

    def output_formats(self) -> dict[str, OutputFormat]:
        """The output formats the plugins offer, by name (the first offered of a name wins)."""
        answers, failures = self._guard.collect(self.manager.hook.windump_output_formats)
        self._warn_failures(failures)
        formats: dict[str, OutputFormat] = {}
        for output_format in (output_format for offered in answers for output_format in offered):
            if output_format.name in formats:
                self._warn(f"output format {output_format.name} is offered twice; the first plugin asked keeps it")
                continue
            formats[output_format.name] = output_format
        return formats

    def _known(self) -> str:
        kinds = self.kinds()
        if not kinds:
            return "no source plugins are loaded (see windump plugins)"
        return "known sources: " + ", ".join(kind.pattern for kind in kinds)

    def _opened(self, hook: str, source: object) -> MemorySource | None:
        if source is None or isinstance(source, MemorySource):
            return source
        raise PluginError(f"{hook} returned {type(source).__name__}, not a MemorySource (a hook wrapper changed it)")

    def open_source(self, spec: str) -> MemorySource:
        """Open what the user named: a ``SCHEME:REST`` location, or else a file path."""
        if LOCATION.match(spec) and not os.path.lexists(spec):
            source = self._opened("windump_open_location", self.manager.hook.windump_open_location(location=spec))
            if source is None:
                raise SourceError(f"no plugin opens {spec}: unknown scheme {spec.split(':', 1)[0]!r}; {self._known()}")
            return source
        try:
            status = os.stat(spec)
        except FileNotFoundError:
            raise SourceError(f"{spec}: No such file or directory") from None
        except OSError as exc:
            raise SourceError(f"{spec}: {exc.strerror}") from exc
        if stat.S_ISDIR(status.st_mode):
            raise SourceError(f"{spec} is a directory, expected a QEMU ELF dump file or SCHEME:...")
        if stat.S_ISREG(status.st_mode) and status.st_size == 0:
            raise SourceError(f"{spec} is empty")
        _refuse_non_dump(spec, status.st_mode)
        try:
            # O_NONBLOCK: a FIFO swapped in after the stat must not block the open; fstat refuses it.
            descriptor = os.open(spec, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
            try:
                _refuse_non_dump(spec, os.fstat(descriptor).st_mode)
                head = os.pread(descriptor, HEAD_SIZE, 0)
            finally:
                os.close(descriptor)
        except OSError as exc:
            raise SourceError(f"{spec}: {exc.strerror}") from exc
        if not head:
            raise SourceError(f"{spec} is empty")
        source = self._opened("windump_open_file", self.manager.hook.windump_open_file(path=spec, head=head))
        if source is None:
            raise SourceError(f"{spec}: no plugin reads this file (starts with {head[:8]!r}); {self._known()}")
        return source


