"""The plugin manager: loads the ``windump`` entry points into pluggy and is the only way the rest
of windump asks them anything.

Every load and every hook call is guarded: a plugin that fails to import, implements a misspelled
hook or raises an unexpected exception is named in a warning or a one-line error, never a
traceback, and the other plugins go on working.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import SourceError, WindumpError
from .hookspecs import PROJECT, SourceKind
from .source import MemorySource

#: Entry-point group that built-in and third-party plugins register in.
ENTRY_POINT_GROUP = "windump"

#: Comma list of entry-point names: when set, only these plugins load (datasette's
#: ``DATASETTE_LOAD_PLUGINS``); set but empty loads none.
ONLY_VARIABLE = "WINDUMP_PLUGINS"

#: Comma list of entry-point names that never load.
DISABLE_VARIABLE = "WINDUMP_DISABLE_PLUGINS"

#: What a location looks like (``sample:``, ``gdb://host:1234``): an RFC 3986 scheme and a colon.
LOCATION = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

#: Bytes of a file's start that ``windump_open_file`` sees.
HEAD_SIZE = 4096


class PluginWarning(UserWarning):
    """A plugin was skipped: it failed to import, to register, or implements an unknown hook."""


class PluginError(WindumpError):
    """A plugin raised something other than a WindumpError, or returned the wrong thing."""


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin as ``windump plugins`` lists it; ``dist`` and ``version`` are None for a
    plugin registered in-process (tests) rather than installed."""

    name: str
    dist: str | None
    version: str | None
    module: str
    kinds: tuple[SourceKind, ...]


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


def _names(environ: Mapping[str, str], variable: str) -> set[str] | None:
    value = environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _reason(exc: BaseException) -> str:
    """One line that says what an exception was, for messages about someone else's code."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_plugins(
    environ: Mapping[str, str] = os.environ,
    warn: Callable[[str], None] = _warn,
) -> Plugins:
    """Load every ``windump`` entry point that ``WINDUMP_PLUGINS`` / ``WINDUMP_DISABLE_PLUGINS``
    allow, each on its own: one that fails is reported through ``warn`` and skipped.

    ``warn`` gets a one-line message; the default issues a :class:`PluginWarning`.
    """
    plugins = Plugins(warn)
    only = _names(environ, ONLY_VARIABLE)
    disabled = _names(environ, DISABLE_VARIABLE) or set()
    found = list(entry_points(group=ENTRY_POINT_GROUP))
    for entry_point in found:
        if (only is not None and entry_point.name not in only) or entry_point.name in disabled:
            continue
        plugins.load_entry_point(entry_point)
    for name in sorted((only or set()) - {entry_point.name for entry_point in found}):
        warn(f"{ONLY_VARIABLE} names plugin {name}, but no installed plugin has that name")
    plugins.check_pending()
    return plugins


class Plugins:
    """A typed facade over pluggy's PluginManager: the calls windump makes, each guarded."""

    def __init__(self, warn: Callable[[str], None] = _warn):
        self._manager = pluggy.PluginManager(PROJECT)
        self._manager.add_hookspecs(hookspecs)
        self._warn = warn
        #: Entry point name -> (distribution name, version) for installed plugins.
        self._origins: dict[str, tuple[str | None, str | None]] = {}

    def load_entry_point(self, entry_point: EntryPoint) -> None:
        """Import and register one entry point; a failure becomes a warning naming the plugin."""
        dist = entry_point.dist
        origin = (dist.name, dist.version) if dist is not None else (None, None)
        try:
            self._manager.register(entry_point.load(), name=entry_point.name)
        except Exception as exc:  # a broken plugin must not stop windump: say so and go on
            where = f"{origin[0]} {origin[1]}" if dist is not None else "unknown distribution"
            self._warn(f"plugin {entry_point.name} ({where}) failed to load: {_reason(exc)}")
            return
        self._origins[entry_point.name] = origin

    def register(self, plugin: object, name: str) -> None:
        """Register an in-process plugin (a module, class or object with hook implementations)."""
        self._manager.register(plugin, name=name)
        self.check_pending()

    def unregister(self, name: str) -> None:
        """Remove the plugin registered as ``name``."""
        self._manager.unregister(name=name)
        self._origins.pop(name, None)

    def check_pending(self) -> None:
        """Unregister, with a warning, every plugin that implements a hook windump does not have
        (a misspelled name would otherwise be silently never called)."""
        while True:
            try:
                self._manager.check_pending()
            except pluggy.PluginValidationError as exc:
                name = self._manager.get_name(exc.plugin) or repr(exc.plugin)
                self._warn(f"plugin {name} skipped: {exc}")
                self._manager.unregister(exc.plugin)
                self._origins.pop(name, None)
            else:
                return

    def names(self) -> list[str]:
        """The registered plugins' names, sorted."""
        return sorted(name for name, _ in self._manager.list_name_plugin())

    def _results(self, hook_name: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Call each implementation of ``hook_name`` in pluggy's order (last registered first,
        tryfirst/trylast honoured), yielding ``(plugin name, result)`` for each non-None result.

        Implementations are called one at a time, not through ``pm.hook``, so an exception can be
        blamed on the plugin that raised it; stop iterating to get firstresult behaviour.
        """
        for impl in reversed(getattr(self._manager.hook, hook_name).get_hookimpls()):
            try:
                result = impl.function(*(kwargs[arg] for arg in impl.argnames))
            except WindumpError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name} failed: {_reason(exc)}") from exc
            if result is not None:
                yield impl.plugin_name, result

    def _first_source(self, hook_name: str, **kwargs: Any) -> MemorySource | None:
        for name, source in self._results(hook_name, **kwargs):
            if not isinstance(source, MemorySource):
                raise PluginError(f"plugin {name} failed: {hook_name} returned {type(source).__name__}, not a MemorySource")
            return source
        return None

    def kinds(self) -> list[SourceKind]:
        """Every source kind the plugins open, in call order, for help text and errors."""
        return [kind for _, kinds in self._results("windump_source_kinds") for kind in kinds]

    def describe(self) -> list[PluginInfo]:
        """Each registered plugin with its distribution, version, module and source kinds, by name."""
        kinds: dict[str, list[SourceKind]] = {}
        for name, contributed in self._results("windump_source_kinds"):
            kinds.setdefault(name, []).extend(contributed)
        described = []
        for name, plugin in self._manager.list_name_plugin():
            dist, version = self._origins.get(name, (None, None))
            module = getattr(plugin, "__name__", None) or type(plugin).__module__
            described.append(PluginInfo(name, dist, version, module, tuple(kinds.get(name, ()))))
        return sorted(described, key=lambda info: info.name)

    def _known(self) -> str:
        kinds = self.kinds()
        if not kinds:
            return "no source plugins are loaded (see windump plugins)"
        return "known sources: " + ", ".join(kind.pattern for kind in kinds)

    def open_source(self, spec: str) -> MemorySource:
        """Open what the user named: a ``SCHEME:REST`` location, or else a file path."""
        if LOCATION.match(spec) and not os.path.lexists(spec):
            source = self._first_source("windump_open_location", location=spec)
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
        try:
            with open(spec, "rb") as file:
                head = file.read(HEAD_SIZE)
        except OSError as exc:
            raise SourceError(f"{spec}: {exc.strerror}") from exc
        if not head:
            raise SourceError(f"{spec} is empty")
        source = self._first_source("windump_open_file", path=spec, head=head)
        if source is None:
            raise SourceError(f"{spec}: no plugin reads this file (starts with {head[:8]!r}); {self._known()}")
        return source
