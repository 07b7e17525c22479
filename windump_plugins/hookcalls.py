"""How windump calls hook implementations: each behind a guard, set up as its plugin registers, that
names the plugin of a failure and lets a collecting call go on without it; and the trace of every
call that ``WINDUMP_TRACE_PLUGINS`` asks for.

The guard wraps the implementations, not the call: pluggy still runs every call
(``manager.hook.NAME(...)``), so wrappers, ``manager.trace`` and hook-call monitoring see it whole.
"""

from __future__ import annotations

import functools
import reprlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .errors import WindumpError
from .hookspecs import HeaderCandidate, OutputFormat, SourceKind
from .source import MemorySource


class PluginError(WindumpError):
    """A plugin raised something other than a WindumpError, or returned the wrong thing."""


@dataclass(frozen=True)
class HookFailure:
    """An implementation of a collecting hook that raised: its plugin's name and the one-line error."""

    plugin: str
    error: WindumpError


def reason(exc: BaseException) -> str:
    """One line that says what an exception was, for messages about someone else's code."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def blame(owner: str, exc: BaseException) -> PluginError:
    """The one-line PluginError for an unexpected exception in ``owner``'s code (``plugin NAME``),
    caused by ``exc``."""
    error = PluginError(f"{owner} failed: {reason(exc)}")
    error.__cause__ = exc
    return error


def _one_of(kind: type, what: str) -> Callable[[object], str | None]:
    return lambda result: None if isinstance(result, kind) else f"{type(result).__name__}, not {what}"


def _list_of(kind: type, what: str) -> Callable[[object], str | None]:
    def check(result: object) -> str | None:
        if not isinstance(result, (list, tuple)):
            return f"{type(result).__name__}, not {what}"
        wrong = next((item for item in result if not isinstance(item, kind)), None)
        return None if wrong is None else f"a list holding {type(wrong).__name__}, not {what}"

    return check


#: How each hook's implementations must answer (None always may): what the guard checks.
_ANSWERS: dict[str, Callable[[object], str | None]] = {
    "windump_open_location": _one_of(MemorySource, "a MemorySource"),
    "windump_open_file": _one_of(MemorySource, "a MemorySource"),
    "windump_source_kinds": _list_of(SourceKind, "a list of SourceKind"),
    "windump_dump_header": _one_of(HeaderCandidate, "a HeaderCandidate"),
    "windump_output_formats": _list_of(OutputFormat, "a list of OutputFormat"),
}


class _StandIn:
    """What the manager registers for a plugin: its hook implementations, each behind a guard, as
    attributes of the same names (the plugin itself stays untouched)."""


class HookGuard:
    """Guards the implementations of every plugin registered through it, and collects the failures
    of the collecting call under way."""

    def __init__(self) -> None:
        #: Failures of the collecting call under way (None: no such call, so a failure raises).
        self._failures: list[HookFailure] | None = None

    def stand_in(self, manager: pluggy.PluginManager, plugin: object, name: str) -> object:
        """The object to register in ``manager`` as ``name``: ``plugin``'s hook implementations, guarded."""
        stand_in = _StandIn()
        for attribute in dir(plugin):
            options = manager.parse_hookimpl_opts(plugin, attribute)
            if options is None:
                continue
            hook = options.get("specname") or attribute
            caller = getattr(manager.hook, hook, None)
            firstresult = caller is not None and caller.spec is not None and caller.spec.opts.get("firstresult")
            guarded = self._guard(getattr(plugin, attribute), name, hook, bool(firstresult),
                                  bool(options.get("wrapper") or options.get("hookwrapper")))
            setattr(stand_in, attribute, hookspecs.hookimpl(guarded, **options))
        return stand_in

    def _guard(self, function: Callable[..., Any], plugin: str, hook: str, firstresult: bool,
               wrapper: bool) -> Callable[..., Any]:
        """``function`` behind a guard: an unexpected exception or a wrong answer becomes a PluginError
        naming ``plugin``; in a collecting call, a failure is recorded and the call goes on."""
        owner = f"plugin {plugin}"
        answers = _ANSWERS.get(hook, lambda result: None)

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                result = function(*args, **kwargs)
                wrong = None if result is None else answers(result)
                if wrong is not None:
                    raise PluginError(f"{owner} failed: {hook} returned {wrong}")
                return result
            except WindumpError as error:
                return self._failed(HookFailure(plugin, error), firstresult)
            except Exception as exc:
                return self._failed(HookFailure(plugin, blame(owner, exc)), firstresult)

        def guarded_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return (yield from function(*args, **kwargs))
            except WindumpError:
                raise
            except Exception as exc:
                raise blame(owner, exc) from exc

        # pluggy reads the arguments an implementation takes through ``__wrapped__``.
        return functools.update_wrapper(guarded_wrapper if wrapper else guarded, function)

    def _failed(self, failure: HookFailure, firstresult: bool) -> None:
        if firstresult or self._failures is None:
            raise failure.error
        self._failures.append(failure)

    def collect(self, hook: Callable[..., list[Any]], **kwargs: Any) -> tuple[list[Any], list[HookFailure]]:
        """Call the collecting ``hook`` (a hook caller of the manager): every implementation's answer
        (None dropped), and the failures of the others. A failing wrapper still raises."""
        outer, self._failures = self._failures, []
        try:
            answers = hook(**kwargs)
        finally:
            failures, self._failures = self._failures, outer
        return answers, failures


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 100

#: Characters of a traced value shown.
TRACE_WIDTH = 200


def _short(value: object) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= TRACE_WIDTH else text[:TRACE_WIDTH - 3] + "..."


def trace_call(hook: str, implementations: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
    """Before a call: the hook, its arguments and the plugins it asks, in call order."""
    arguments = ", ".join(f"{name}={_short(value)}" for name, value in kwargs.items())
    asked = ", ".join(impl.plugin_name for impl in reversed(implementations)) or "no implementation"
    print(f"windump: trace: {hook}({arguments}) asks {asked}", file=sys.stderr)


def trace_result(outcome: pluggy.Result[Any], hook: str, implementations: Sequence[pluggy.HookImpl],
                 kwargs: Mapping[str, Any]) -> None:
    """After a call: what it returned (every answer of a collecting hook), or what it raised."""
    exception = outcome.exception
    said = f"raised {type(exception).__name__}: {exception}" if exception else f"-> {_short(outcome.get_result())}"
    print(f"windump: trace: {hook} {said}", file=sys.stderr)
