"""The choice of one dump header among the candidates the plugins built for a source, in a declared
order, and the cross-check of the others against it."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import WindumpError, WindumpWarning
from ..hookcalls import HookFailure, PluginError
from ..hookspecs import HeaderCandidate

logger = logging.getLogger(__name__)

#: Header methods, most trusted first: the header the guest's own driver published, then one built
#: from the kernel's data structures. Methods not named here come after, in the plugins' call order.
PREFERENCE = ("published", "symbols")

#: Header fields that describe the guest rather than the moment of the dump: every sound method
#: must find the same values.
CROSS_CHECKED = ("MajorVersion", "MinorVersion", "DirectoryTableBase", "PsLoadedModuleList",
                 "PsActiveProcessHead", "MachineImageType")

NO_HEADER_MESSAGE = "no plugin builds a dump header for {source} (windump plugins lists the loaded plugins)"


def _rank(method: str) -> int:
    return PREFERENCE.index(method) if method in PREFERENCE else len(PREFERENCE)


def disagreements(chosen: HeaderCandidate, other: HeaderCandidate) -> list[str]:
    """Where ``other`` differs from ``chosen``: ``FIELD 0x.. (METHOD: 0x..)`` for each field of
    :data:`CROSS_CHECKED` and for the runs."""
    if other.format is not chosen.format:
        return [f"the header format {other.format.name} ({chosen.method}: {chosen.format.name})"]
    found = [f"{field} {int(other.header[field]):#x} ({chosen.method}: {int(chosen.header[field]):#x})"
             for field in CROSS_CHECKED if int(other.header[field]) != int(chosen.header[field])]
    if not np.array_equal(np.asarray(other.runs, dtype=np.uint64), np.asarray(chosen.runs, dtype=np.uint64)):
        found.append(f"{len(other.runs)} runs of {int(np.asarray(other.runs)[:, 1].sum()):#x} pages "
                     f"({chosen.method}: {len(chosen.runs)} runs of {int(np.asarray(chosen.runs)[:, 1].sum()):#x})")
    return found


def choose_header(candidates: Sequence[HeaderCandidate], failures: Sequence[HookFailure],
                  source: str) -> HeaderCandidate:
    """The candidate whose method comes first in :data:`PREFERENCE` (then in call order); each other
    candidate that disagrees with it is a :class:`WindumpWarning`.

    Failures are reported too: a plugin's bug (PluginError) as a warning, a method that could not
    apply in the log. With no candidate, the failure of the most trusted method is raised (the
    published header's set-up hint when that is all there is).
    """
    ranked_failures = sorted(failures, key=lambda failure: _rank(failure.plugin))
    if not candidates:
        if ranked_failures:
            for failure in ranked_failures[1:]:
                logger.info("header method %s failed too: %s", failure.plugin, failure.error)
            raise ranked_failures[0].error
        raise WindumpError(NO_HEADER_MESSAGE.format(source=source))
    ranked = sorted(candidates, key=lambda candidate: _rank(candidate.method))
    chosen = ranked[0]
    for failure in ranked_failures:
        if isinstance(failure.error, PluginError):
            warnings.warn(str(failure.error), WindumpWarning, stacklevel=3)
        else:
            logger.info("header method %s does not apply: %s", failure.plugin, failure.error)
    for other in ranked[1:]:
        found = disagreements(chosen, other)
        if found:
            warnings.warn(f"the {other.method} header disagrees with the {chosen.method} one the dump uses: "
                          + ", ".join(found), WindumpWarning, stacklevel=3)
    logger.info("dump header from method %s%s", chosen.method,
                f", cross-checked against {', '.join(other.method for other in ranked[1:])}" if len(ranked) > 1 else "")
    return chosen
