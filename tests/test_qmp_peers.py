"""QmpConnection against peers that are not (or not yet) the QMP monitor it expects: each ends
within ``timeout`` with one line that says what the peer is, and Ctrl-C while waiting is clean."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from elfmaker import TinyGuest
from qmpfake import FakeQemu

from windump_plugins.errors import SourceError
from windump_plugins.live.qmp import QmpConnection

GREETING = json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                               "capabilities": []}}).encode() + b"\r\n"


class Peer:
    """A TCP listener on 127.0.0.1 that says ``words`` to the one client it accepts (none when not
    ``accepting``), then keeps the connection open and silent, recording what the client sent."""

    def __init__(self, words: bytes = b"", *, accepting: bool = True, answer: bytes = b"") -> None:
        self.words, self.answer, self.received = words, answer, b""
        self.server = socket.create_server(("127.0.0.1", 0), backlog=4)
        self.address = self.server.getsockname()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True) if accepting else None
        if self.thread:
            self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            connection, _ = self.server.accept()
            with connection:
                connection.sendall(self.words)
                while data := connection.recv(4096):
                    self.received += data
                    if self.answer:
                        connection.sendall(self.answer)
        self.done.set()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def peer():
    peers: list[Peer] = []

    def start(*args, **kwargs) -> Peer:
        peers.append(Peer(*args, **kwargs))
        return peers[-1]

    yield start
    for each in peers:
        each.close()


def connect(address, timeout: float = 0.5) -> tuple[str, float]:
    """The SourceError message QmpConnection ends with, and how long it took."""
    started = time.monotonic()
    with pytest.raises(SourceError) as failure:
        QmpConnection(address, timeout=timeout, description="qmp://test").close()
    return str(failure.value), time.monotonic() - started


@pytest.mark.timeout(20)
def test_a_partial_greeting_ends_after_the_timeout_without_spinning(peer):
    """Three bytes of a greeting and then nothing: an error after ``timeout``, having slept (not spun)."""
    server = peer(b'{"Q')
    cpu = time.process_time()
    message, elapsed = connect(server.address)
    assert "sent b'{\"Q' and then nothing for 0.5 s" in message
    assert 0.4 < elapsed < 3
    assert time.process_time() - cpu < 0.3


@pytest.mark.timeout(20)
def test_a_peer_that_greets_and_falls_silent_ends_after_the_timeout(tmp_path):
    path = str(tmp_path / "qmp.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    accepted = []

    def greet() -> None:
        connection, _ = server.accept()
        accepted.append(connection)
        connection.sendall(GREETING)

    thread = threading.Thread(target=greet, daemon=True)
    thread.start()
    try:
        message, elapsed = connect(path)
    finally:
        thread.join()
        for connection in accepted:
            connection.close()
        server.close()
    assert message == "qmp://test: QEMU gave no answer to qmp_capabilities within 0.5 s"
    assert 0.4 < elapsed < 3


@pytest.mark.timeout(20)
def test_a_gdbstub_is_named_and_detached(peer):
    """A gdbstub that stopped a running VM on accepting us sends a stop reply; windump says use
    gdb://, and detaches so QEMU runs the VM again."""
    server = peer(b"$T05thread:p01.01;#06", answer=b"+$OK#9a")
    message, _ = connect(server.address)
    host, port = server.address
    assert message == (f"qmp://test: {host}:{port} answers like a gdbstub (it sent b'$T05thread:p01.01;#06'): "
                       f"this looks like a gdbstub; use gdb://{host}:{port}")
    assert server.done.wait(5)
    assert server.received == b"+$D#44"


@pytest.mark.timeout(20)
def test_a_silent_peer_is_sent_nothing(peer):
    """A peer that accepts and says nothing (a gdbstub of a stopped VM, say) is left as it was."""
    server = peer()
    message, elapsed = connect(server.address)
    host, port = server.address
    assert message == (f"qmp://test: {host}:{port} accepted the connection but sent nothing within 0.5 s: not a "
                       f"QEMU QMP monitor (a gdbstub of a stopped VM is silent too; for one, use gdb://{host}:{port})")
    assert server.done.wait(5) and server.received == b""


@pytest.mark.timeout(20)
def test_a_monitor_held_by_another_client(peer):
    """QEMU accepts one client per monitor: ours waits in the accept queue, and the error says so."""
    server = peer(accepting=False)
    message, _ = connect(server.address)
    assert message == (f"qmp://test: QEMU has not accepted the connection to {server.address[0]}:{server.address[1]} "
                       f"within 0.5 s: another client may hold the monitor (QEMU serves one client per QMP monitor)")


@pytest.mark.timeout(60)
def test_ctrl_c_while_qemu_is_silent_is_a_clean_keyboard_interrupt(tmp_path):
    """Ctrl-C while a command waits for QEMU: KeyboardInterrupt, and nothing on stderr."""
    script = textwrap.dedent(f"""
        import signal, socket, threading
        from windump_plugins.live.qmp import QmpConnection
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind({str(tmp_path / "qmp.sock")!r})
        server.listen()
        held = []
        def greet():
            connection, _ = server.accept()
            held.append(connection)
            connection.sendall({GREETING!r})
            threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        threading.Thread(target=greet, daemon=True).start()
        try:
            QmpConnection({str(tmp_path / "qmp.sock")!r}, timeout=30, description="qmp:test")
        except KeyboardInterrupt:
            print("interrupted")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=40)
    assert (result.returncode, result.stdout, result.stderr) == (0, "interrupted\n", "")


@pytest.mark.timeout(30)
def test_after_ctrl_c_in_a_command_the_connection_still_resumes_the_guest(tmp_path, monkeypatch):
    """Ctrl-C while ``stop`` waits: QEMU stops the guest anyway, and resuming still sends ``cont``
    over the same connection (QEMU's late answer to ``stop`` is not taken for the answer to another)."""
    qemu = FakeQemu(tmp_path, TinyGuest([(0, 0x100000)], seed=5), running=True)
    stop = FakeQemu._stop

    def slow_stop(self, connection):
        time.sleep(1.0)
        return stop(self, connection)

    monkeypatch.setattr(FakeQemu, "_stop", slow_stop)
    try:
        connection = QmpConnection(qemu.path, timeout=10, description="qmp:test")
        threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            connection.pause()
        assert connection.query("query-status", "running") == {"running": False, "status": "paused"}
        connection.resume()
        assert qemu.running and qemu.commands[-1] == "cont"
        connection.close()
    finally:
        qemu.close()
