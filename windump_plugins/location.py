"""Parsing of ``SCHEME://HOST:PORT?OPTIONS`` source locations, shared by the network sources so they
read hosts, ports and options alike and refuse the same mistakes with the same words."""

from __future__ import annotations

import urllib.parse

from .errors import SourceError


def host_and_port(location: str, parts: urllib.parse.SplitResult, usage: str) -> tuple[str, int]:
    """The host and port of ``parts`` (from ``urlsplit(location)``); SourceError ``LOCATION: usage``
    when either is missing or the location has a path."""
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number, or out of range
        host = port = None
    if not host or port is None or parts.path not in ("", "/"):
        raise SourceError(f"{location}: {usage}")
    return host, port


def options(location: str, parts: urllib.parse.SplitResult, known: tuple[str, ...]) -> dict[str, str]:
    """The ``?a=1&b`` options of ``parts`` as a dict (a bare name maps to ""); SourceError for a name
    not in ``known``."""
    found = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(found) - set(known))
    if unknown:
        raise SourceError(f"{location}: unknown option {unknown[0]!r}; known: {', '.join(known)}")
    return found
