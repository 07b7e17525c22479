"""The GDB remote protocol client against scripted stubs on loopback: framing, acks, escapes, run
lengths, pipelined reads, and the failures a user can hit (wrong stub, silence, dropped connection)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading

import pytest

from windump_plugins.errors import SourceError
from windump_plugins.live.rsp import RemoteStub
from windump_plugins.live.rsppacket import checksum, decode, escape, frame
from windump_plugins.live.targetxml import parse_target_description
from windump_plugins.sources.gdbstub import GdbStubSource


class FakeStub:
    """A one-connection stub on 127.0.0.1: ``answer(payload)`` returns the raw bytes to send back,
    or None to drop the connection. Like QEMU it acks each packet with ``+``."""

    def __init__(self, answer, greeting: bytes = b"") -> None:
        self.answer = answer
        self.greeting = greeting
        self.requests: list[bytes] = []
        self.raw = b""  # everything the client sent
        self.ack = True  # until QStartNoAckMode
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        connection, _ = self._server.accept()
        with connection, contextlib.suppress(OSError):  # the client may hang up on us
            connection.sendall(self.greeting)
            received = b""
            while True:
                match = re.search(rb"\$([^#]*)#[0-9a-f]{2}", received)
                if match is None:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    received += chunk
                    self.raw += chunk
                    continue
                received = received[match.end() :]
                payload = match[1]
                self.requests.append(payload)
                reply = self.answer(payload)
                if reply is None:
                    return
                connection.sendall(b"+" * self.ack + reply)
                if payload == b"QStartNoAckMode":
                    self.ack = False

    def close(self) -> None:
        self._server.close()
        self._thread.join(5)


def qemu_like(memory: bytes, packet_size: int = 0x100, encode=frame):
    """An ``answer`` that serves ``memory`` from address 0 and the queries a connection starts with."""

    def answer(payload: bytes) -> bytes | None:
        if payload.startswith(b"qSupported"):
            return frame(b"PacketSize=%x;qXfer:features:read+" % packet_size)
        if payload == b"?":
            return frame(b"T05thread:p01.01;")
        if payload == b"qqemu.Supported":
            return frame(b"sstepbits;sstep;PhyMemMode")
        if payload.startswith(b"m"):
            address, length = (int(x, 16) for x in payload[1:].split(b","))
            if address + length > len(memory):
                return frame(b"E14")
            return encode(memory[address : address + length].hex().encode())
        return frame(b"")

    return answer


@pytest.fixture
def fake():
    stubs = []

    def start(answer, greeting=b""):
        stub = FakeStub(answer, greeting)
        stubs.append(stub)
        return stub

    yield start
    for stub in stubs:
        stub.close()


def test_checksums_match_the_protocol_examples():
    # Packets as printed in the GDB manual and seen on the wire.
    assert frame(b"g") == b"$g#67"
    assert frame(b"?") == b"$?#3f"
    assert frame(b"OK") == b"$OK#9a"
    assert checksum(b"") == 0


def test_escape_covers_the_four_special_bytes():
    assert escape(b"a}b$c#d*e") == b"a}]b}\x04c}\x03d}\x0ae"
    framed = frame(b"$")
    assert framed == b"$}\x04#%02x" % ((0x7D + 0x04) & 0xFF)
    assert decode(escape(bytes(range(256)))) == bytes(range(256))


def test_decode_expands_run_lengths():
    # The manual's example: "0* " is "0000" (a space is 32, so 32 - 29 = 3 more).
    assert decode(b"0* ") == b"0000"
    assert decode(b"ab*\"c") == b"abbbbbbc"  # '"' is 34: five more b
    assert decode(b"}]*!") == b"}" * 5  # a run repeats the unescaped byte
    with pytest.raises(SourceError):
        decode(b"* ")


def test_target_description_follows_includes_and_skips_comments():
    documents = {
        "target.xml": b'<target><xi:include href="core.xml"/><xi:include href="sse.xml"/></target>',
        "core.xml": b'<feature><reg name="rax" bitsize="64" regnum="0"/><!--reg name="gone" bitsize="64"/-->'
        b'<reg name="eflags" bitsize="32"/></feature>',
        "sse.xml": b'<feature><reg name="xmm0" bitsize="128" regnum="5"/><reg name="mxcsr" bitsize="32"/></feature>',
    }
    registers = parse_target_description(documents)
    assert [(r.name, r.regnum, r.offset, r.size) for r in registers] == [
        ("rax", 0, 0, 8),
        ("eflags", 1, 8, 4),
        ("xmm0", 5, 12, 16),
        ("mxcsr", 6, 28, 4),
    ]


def test_pipelined_read_returns_the_memory(fake):
    memory = os.urandom(0x9000)
    stub = fake(qemu_like(memory))
    with RemoteStub("127.0.0.1", stub.port) as remote:
        assert remote.packet_size == 0x100 and remote.max_read == 0x80
        assert remote.read_memory(0x123, 0x8000) == memory[0x123:0x8123]
        assert remote.read_memory(0x8FF0, 0x10) == memory[0x8FF0:]
    reads = [r for r in stub.requests if r.startswith(b"m")]
    assert len(reads) == 0x8000 // 0x80 + 1
    assert all(int(r.split(b",")[1], 16) <= 0x80 for r in reads)


def test_no_ack_mode_when_offered(fake):
    memory = os.urandom(0x1000)
    serve = qemu_like(memory)

    def answer(payload):
        if payload.startswith(b"qSupported"):
            return frame(b"PacketSize=100;QStartNoAckMode+")
        return frame(b"OK") if payload == b"QStartNoAckMode" else serve(payload)

    stub = fake(answer)
    with RemoteStub("127.0.0.1", stub.port) as remote:
        assert remote.no_ack
        assert remote.read_memory(0x10, 0xF00) == memory[0x10:0xF10]
    after = stub.raw.split(frame(b"QStartNoAckMode"), 1)[1]
    assert after.startswith(b"+") and b"+" not in after[1:]  # only the ack of the OK itself


def test_pipelined_read_decodes_run_lengths(fake):
    memory = bytes(0x400) + os.urandom(0x400)

    def run_length(hexdigits: bytes) -> bytes:
        # Compress every run of 4+ equal digits as the stub may (up to 97 more per '*').
        body = re.sub(rb"(.)\1{3,96}", lambda m: m[1] + b"*" + bytes([len(m[0]) - 1 + 29]), hexdigits)
        return b"$%s#%02x" % (body, checksum(body))

    stub = fake(qemu_like(memory, encode=run_length))
    with RemoteStub("127.0.0.1", stub.port) as remote:
        assert remote.read_memory(0, 0x800) == memory


def test_bad_reply_checksum_is_an_error(fake):
    stub = fake(lambda payload: frame(b"PacketSize=100") if payload.startswith(b"qSupported") else b"$OK#00")
    with RemoteStub("127.0.0.1", stub.port) as remote, pytest.raises(SourceError, match="bad checksum"):
        remote.command(b"qqemu.Supported")


def test_bad_checksum_in_a_pipelined_reply_is_an_error(fake):
    def corrupt(hexdigits: bytes) -> bytes:
        return b"$%s#%02x" % (hexdigits, (checksum(hexdigits) + 1) & 0xFF)

    stub = fake(qemu_like(bytes(0x1000), encode=corrupt))
    with RemoteStub("127.0.0.1", stub.port) as remote, pytest.raises(SourceError, match="bad checksum"):
        remote.read_memory(0, 0x1000)


def test_read_error_names_the_address(fake):
    stub = fake(qemu_like(bytes(0x1000)))
    with RemoteStub("127.0.0.1", stub.port) as remote:
        with pytest.raises(SourceError, match=r"at 0x1000: the stub answered 'E14'"):
            remote.read_memory(0xF00, 0x200)
        assert remote.read_memory(0, 4) == bytes(4)  # the connection is still in step


def test_unasked_stop_reply_is_skipped_and_remembered(fake):
    # QEMU sends this the moment attaching stops a running VM.
    stub = fake(qemu_like(b"abcd"), greeting=frame(b"T02thread:p01.01;"))
    with RemoteStub("127.0.0.1", stub.port) as remote:
        assert remote.stopped_running_vm
        assert remote.require_qemu() == {"sstepbits", "sstep", "PhyMemMode"}
        assert remote.stop_reason() == b"T05thread:p01.01;"
        assert remote.read_memory(0, 4) == b"abcd"


def test_monitor_joins_console_output(fake):
    def answer(payload):
        if payload.startswith(b"qRcmd,"):
            assert bytes.fromhex(payload[6:].decode()) == b"info status"
            return frame(b"O" + b"VM status: ".hex().encode()) + frame(b"O" + b"paused\r\n".hex().encode()) + frame(b"OK")
        return frame(b"")

    stub = fake(answer)
    with RemoteStub("127.0.0.1", stub.port) as remote:
        assert remote.monitor("info status") == "VM status: paused\n"


def test_non_qemu_stub_is_named(fake):
    stub = fake(lambda payload: frame(b"PacketSize=3fff" if payload.startswith(b"qSupported") else b""))
    with RemoteStub("127.0.0.1", stub.port) as remote, pytest.raises(SourceError, match="not a QEMU gdbstub"):
        remote.require_qemu()


def test_source_refuses_a_non_qemu_stub(fake):
    stub = fake(lambda payload: frame(b"PacketSize=3fff;qXfer:features:read+" if payload.startswith(b"qSupported") else b""))
    with pytest.raises(SourceError, match="not a QEMU gdbstub"):
        GdbStubSource("127.0.0.1", stub.port)


def test_dropped_connection_is_one_line(fake):
    memory = bytes(0x4000)
    serve = qemu_like(memory)
    reads = []

    def answer(payload):
        if payload.startswith(b"m"):
            reads.append(payload)
            if len(reads) == 20:
                return None
        return serve(payload)

    stub = fake(answer)
    with RemoteStub("127.0.0.1", stub.port) as remote:
        with pytest.raises(SourceError, match=r"^gdb://127\.0\.0\.1:\d+: (the stub closed the connection|connection lost)"):
            remote.read_memory(0, 0x4000)


def test_silent_stub_times_out(fake):
    stub = fake(lambda payload: frame(b"PacketSize=100") if payload.startswith(b"qSupported") else b"")
    with RemoteStub("127.0.0.1", stub.port, timeout=0.3) as remote:
        with pytest.raises(SourceError, match=r"no reply from the stub within 0\.3 s$"):
            remote.command(b"qqemu.Supported")


def test_busy_stub_hints_at_another_debugger():
    with socket.create_server(("127.0.0.1", 0)) as server:  # listens, never answers: like QEMU with a client
        with pytest.raises(SourceError, match="another debugger attached"):
            RemoteStub("127.0.0.1", server.getsockname()[1], timeout=0.3)


def test_refused_connection_is_one_line():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    with pytest.raises(SourceError, match=r"^gdb://127\.0\.0\.1:\d+: cannot connect"):
        RemoteStub("127.0.0.1", port)
