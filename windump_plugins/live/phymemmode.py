"""QEMU's gdbstub switched to physical memory while windump reads, and QEMU left as found after:
``Qqemu.PhyMemMode`` restored, and a VM that attaching stopped resumed, over a fresh connection
when ours was lost."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol, Self

from ..errors import SourceError, WindumpError, WindumpWarning

log = logging.getLogger(__name__)


class PhyMemStub(Protocol):
    """What switching needs of a gdbstub connection (a RemoteStub, or gdb's own through an adapter)."""

    address: str

    @property
    def stopped_running_vm(self) -> bool: ...
    def phy_mem_mode(self) -> int: ...
    def set_phy_mem_mode(self, mode: int) -> None: ...
    def detach(self) -> None: ...
    def close(self) -> None: ...


class PhyMemMode:
    """``PhyMemMode`` set to ``mode`` on ``stub`` from construction until :meth:`leave`.

    The mode is global in QEMU and outlives our connection: left changed, it would turn the next
    debugger's virtual reads into physical ones. Leaving restores it and, with ``resume``, detaches
    when attaching stopped a running VM, so the guest runs on. When ``stub`` is lost or out of
    step, ``reconnect`` (if given) opens a fresh connection to do it; if even that fails the error
    says so, except after an interruption (Ctrl-C), which must stay the outcome: then it is a
    warning. As a context manager it leaves on exit, an exception other than a WindumpError
    counting as an interruption.
    """

    def __init__(self, stub: PhyMemStub, *, mode: int = 1, resume: bool = False,
                 reconnect: Callable[[], AbstractContextManager[PhyMemStub]] | None = None) -> None:
        self.stub = stub
        self.mode = mode
        self.resume = resume
        self.reconnect = reconnect
        self.saved = stub.phy_mem_mode()
        self._left = False
        if self.saved != mode:
            stub.set_phy_mem_mode(mode)
            log.debug("gdb://%s: PhyMemMode %d (was %d)", stub.address, mode, self.saved)

    def leave(self, *, interrupted: bool = False) -> None:
        """Leave QEMU as found; only the first call does anything."""
        if self._left:
            return
        self._left = True
        try:
            self._restore(self.stub)
        except SourceError as lost:
            if self.reconnect is None:
                raise
            self.stub.close()  # QEMU serves one client at a time
            log.info("gdb://%s: restoring PhyMemMode over a fresh connection (%s)", self.stub.address, lost)
            try:
                with self.reconnect() as fresh:
                    self._restore(fresh)
            except SourceError as failed:
                message = (f"{lost}; PhyMemMode may be left at {self.mode} for the next debugger "
                           f"(reconnecting failed: {failed})")
                if not interrupted:
                    raise SourceError(message) from None
                warnings.warn(message, WindumpWarning, stacklevel=3)

    def _restore(self, stub: PhyMemStub) -> None:
        if self.saved != self.mode:
            stub.set_phy_mem_mode(self.saved)
        if self.resume and self.stub.stopped_running_vm:
            stub.detach()
            log.info("gdb://%s: detached, so the VM runs on", stub.address)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc_info: object) -> None:
        self.leave(interrupted=kind is not None and not issubclass(kind, WindumpError))
