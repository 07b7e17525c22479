"""How the command line ends on a signal: SIGTERM, SIGHUP and SIGQUIT interrupt it the way Ctrl-C
does, so every cleanup a KeyboardInterrupt runs (the guest resumed, PhyMemMode restored, the
temporary dump removed) runs for them too, and the exit status names the signal (128 + N).

Only the first signal interrupts. From then on the program is cleaning up, and cleanup must not be
cut short halfway (a guest left paused, a temporary file left behind): later signals are noted on
stderr and otherwise ignored until the program exits. The same holds inside :class:`holding`
blocks and after :func:`hold`, for steps that must finish once begun.

This module imports nothing heavy: ``python -m windump_plugins`` installs it before anything else.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType, TracebackType
from typing import Any

#: The signals that end the command line cleanly: a closed terminal, Ctrl-C, Ctrl-\\, ``kill``.
HANDLED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A handled signal arrived, raised where the program was so that cleanup runs as after Ctrl-C.

    A subclass rather than KeyboardInterrupt itself, for SIGINT too: CPython marks a plain
    KeyboardInterrupt that passes through C code running Python (an extension module's start-up),
    and at exit kills itself with SIGINT instead of returning the status the program chose, even
    when the program caught it. Measured here: 3 of 40 Ctrl-C during start-up did that.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _State:
    prog = "windump"
    #: The first handled signal received, None before any.
    signum: int | None = None
    #: Open :class:`holding` blocks.
    depth = 0
    #: Set once a signal has interrupted, or by :func:`hold`: no signal raises any more.
    final = False


def install(prog: str) -> None:
    """Handle :data:`HANDLED` from now on; a signal already ignored (``nohup``, a background job)
    stays ignored, as the shell asked."""
    _State.prog, _State.signum, _State.depth, _State.final = prog, None, 0, False
    for signum in HANDLED:
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signum, _handle)


def _handle(signum: int, frame: FrameType | None) -> None:
    if _State.signum is None and not (_State.final or _State.depth):
        _State.signum, _State.final = signum, True
        raise Interrupted(signum)
    if _State.signum is None:
        _State.signum = signum
    if sys.stderr is None:  # started with stderr closed: its descriptor may be the dump's by now
        return
    try:  # to the descriptor, not through sys.stderr: the handler may run in the middle of a write to it
        line = f"{_State.prog}: {signal.Signals(signum).name}: finishing the cleanup first\n"
        os.write(sys.stderr.fileno(), line.encode())
    except (OSError, ValueError):  # stderr gone with the terminal, or not a file
        pass


class holding:
    """While the block runs, a handled signal is noted, not raised: for the cleanup after an error
    (putting the guest back), which must finish once begun; the error then goes on as the reason."""

    def __enter__(self) -> holding:
        _State.depth += 1
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        _State.depth -= 1


def hold() -> None:
    """From now on no signal interrupts: what is left (closing the source after the dump is in
    place, printing its summary) finishes, and the exit status is that of the finished work."""
    _State.final = True


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process that a signal ended; 130 for a
    KeyboardInterrupt raised by anything else."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def interrupted_line(prog: str, interrupt: KeyboardInterrupt) -> str:
    """``windump: interrupted`` after Ctrl-C, ``windump: interrupted by SIGTERM`` after another signal."""
    signum = getattr(interrupt, "signum", signal.SIGINT)
    return f"{prog}: interrupted" + ("" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}")


#: Bytes that hold a C ``struct sigaction`` on every Linux ABI (152 on x86-64 and arm64).
_SIGACTION_BYTES = 512


class interrupting:
    """For a command inside a host program (gdb's ``windump-save``): while the block runs, the
    signals ``signums`` raise :class:`Interrupted`, the first one only, as in the command line;
    afterwards the host's own handlers are back exactly, C handlers included, and the signal that
    arrived is sent again so that the host answers it as it would have (gdb ends on a hangup or
    SIGTERM). A signal the host ignores is left alone.

    Python's ``signal.signal`` cannot put back a handler that was not installed from Python (gdb's
    are C functions), so the C ``sigaction`` is saved and restored through ctypes.
    """

    def __init__(self, *signums: int) -> None:
        self.signums = signums
        #: The first of ``signums`` that arrived, None before any.
        self.received: int | None = None
        self._final = False
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> interrupting:
        import ctypes

        self._sigaction = ctypes.CDLL(None, use_errno=True).sigaction
        self._sigaction.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        for signum in self.signums:
            action = ctypes.create_string_buffer(_SIGACTION_BYTES)
            if self._sigaction(signum, None, action) != 0:
                continue
            if ctypes.c_void_p.from_buffer(action).value == signal.SIG_IGN:  # sa_handler comes first
                continue
            signal.signal(signum, self._handle)
            self._saved[signum] = action
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            if not self._final:
                self._final = True
                raise Interrupted(signum)

    def hold(self) -> None:
        """From now on a signal is noted, not raised: the rest of the command finishes first."""
        self._final = True

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if not self._saved:
            return
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, self._saved)  # none lost while swapping
        for signum, action in self._saved.items():
            signal.signal(signum, signal.SIG_DFL)  # what Python's table says; the C handler is the host's:
            self._sigaction(signum, action, None)
        if self.received is not None:  # to this thread, which blocks it: the host's handler runs on unblocking
            import threading

            signal.pthread_kill(threading.get_ident(), self.received)
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            signal.pthread_sigmask(signal.SIG_BLOCK, ())  # a call, where Python raises what gdb asked:
        except KeyboardInterrupt:  # gdb answers SIGTERM with a quit, which its Python raises here
            pass
