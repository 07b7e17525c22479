"""``windump-save`` inside a real gdb attached to the QEMU test bed: the selected thread, the
installed copy of the gdb script, and the faults that must end in one line with PhyMemMode restored
and no dump written (test_live_paths compares its dumps, and ``windump save gdb://``'s, with QEMU's)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from qemu_guest import REPO, VARIANTS, free_port
from readers import kdmp_read
from test_gdbstub_source import Qemu, note, seed

from windump_plugins.headers.published import NO_NOTE_MESSAGE

pytestmark = [pytest.mark.qemu, pytest.mark.gdb]

VARIANT = {variant.name: variant for variant in VARIANTS}
HALTED = VARIANT["pc-256M-1cpu"]
FOUR_CPUS = VARIANT["q35-256M-4cpu"]
SCRIPT = REPO / "gdb" / "windump.py"
GDB = shutil.which("gdb")


def gdb(port: int | None, *commands: str, script: Path = SCRIPT, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``gdb -batch``: attach to ``port`` (unless None), source ``script``, run ``commands``."""
    environ = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    environ["VIRTUAL_ENV"] = sys.prefix  # gdb embeds the system Python; the packages are in our venv
    environ.update(env or {})
    arguments = [GDB, "-batch", "-nx", "-ex", "set pagination off"]
    if port is not None:
        arguments += ["-ex", f"target remote 127.0.0.1:{port}"]
    arguments += ["-x", str(script)]
    for command in commands:
        arguments += ["-ex", command]
    return subprocess.run(arguments, capture_output=True, text=True, timeout=300, env=environ, cwd=cwd,
                          stdin=subprocess.DEVNULL)


#: Run after windump-save: the mode QEMU is left in, and whether gdb's connection is still in step.
AFTERWARDS = ("maint packet qqemu.PhyMemMode", "info registers rip")


def check_left_clean(result: subprocess.CompletedProcess) -> None:
    assert 'received: "0"' in result.stdout, result.stdout + result.stderr  # PhyMemMode restored
    assert re.search(r"^rip +0x[0-9a-f]+", result.stdout, re.M), result.stdout + result.stderr


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """gdb's stderr without its notes about the missing executable."""
    noise = ("warning: No executable", "determining executable automatically")
    return [line for line in result.stderr.splitlines() if line and not any(part in line for part in noise)]


@pytest.fixture
def halted(booted_once):
    """The halted 1-vCPU guest, stopped again after the test (gdb -batch detaches at exit, resuming it)."""
    guest = booted_once(HALTED)
    yield guest
    guest.qemu.execute("stop")


def test_selected_thread_gives_the_header_context(booted_once, tmp_path):
    """gdb thread 3 is vCPU 2: its registers become the header's CONTEXT."""
    guest = booted_once(FOUR_CPUS)
    guest.qemu.execute("stop")
    expected = guest.qemu.registers()[2]
    ours = tmp_path / "thread3.dmp"
    try:
        result = gdb(guest.qemu.gdb_port, "thread 3", f"windump-save {ours}", "thread")
    finally:
        guest.qemu.execute("stop")
    assert result.returncode == 0 and "header context: vCPU 2" in result.stdout, result.stdout + result.stderr
    assert "Current thread is 3" in result.stdout  # the user's selection is kept
    context = kdmp_read(ours).context
    assert (context["Rip"], context["Rsp"], context["Rax"], context["R15"]) == (
        expected["rip"], expected["rsp"], expected["rax"], expected["r15"])


def test_ctrl_c_leaves_no_file_and_restores_phymemmode(halted, tmp_path):
    """SIGINT in the middle of the pipelined reads: one line, no file, PhyMemMode 0, gdb in step."""
    interrupt = ("python import os, signal; from windump_plugins.live import gdbconnection as g; r = g.GdbConnection.readinto; "
                 "n = [0]\n"
                 "def readinto(self, *a):\n"
                 "    n[0] += 1\n"
                 "    if n[0] == 6: os.kill(os.getpid(), signal.SIGINT)\n"
                 "    return r(self, *a)\n"
                 "g.GdbConnection.readinto = readinto")
    script = tmp_path / "interrupt.py"
    script.write_text(interrupt.removeprefix("python ") + "\n")
    result = gdb(halted.qemu.gdb_port, f"source {script}", f"windump-save --packets {tmp_path}/x.dmp",
                 *AFTERWARDS, cwd=tmp_path)
    assert error_lines(result) == ["windump-save: interrupted: no dump written, PhyMemMode restored"], result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["interrupt.py"]
    check_left_clean(result)


def test_no_published_header(tmp_path):
    qemu = Qemu(tmp_path / "fresh")
    try:
        result = gdb(qemu.port, f"windump-save {tmp_path}/x.dmp", *AFTERWARDS)
    finally:
        qemu.close()
    assert error_lines(result) == [f"windump-save: {NO_NOTE_MESSAGE}"], result.stderr
    assert not (tmp_path / "x.dmp").exists()
    check_left_clean(result)


def test_connection_dropped_mid_dump(tmp_path):
    qemu = Qemu(tmp_path / "dropped")
    seed(qemu.location, 0x3F00000, note())  # near the top: the scan reads most of RAM first
    hook = tmp_path / "drop.py"
    hook.write_text("import os, signal\nfrom windump_plugins.live import gdbconnection as g\nr = g.GdbConnection.readinto\n"
                    "n = [0]\n"
                    "def readinto(self, *a):\n"
                    "    n[0] += 1\n"
                    f"    if n[0] == 2: os.kill({qemu.process.pid}, signal.SIGKILL)\n"
                    "    return r(self, *a)\n"
                    "g.GdbConnection.readinto = readinto\n")
    try:
        result = gdb(qemu.port, f"source {hook}", f"windump-save --packets {tmp_path}/x.dmp")
    finally:
        qemu.close()
    lines = error_lines(result)
    assert len(lines) >= 1 and re.fullmatch(
        r"windump-save: gdb://127\.0\.0\.1:\d+: (the stub closed the connection|connection lost: .*)", lines[0]), result.stderr
    assert not (tmp_path / "x.dmp").exists()


def fake_stub(server: socket.socket) -> None:
    """A gdbstub that is not QEMU's: enough for ``target remote``, empty replies to the rest."""
    connection, _ = server.accept()
    replies = {b"?": b"S05", b"g": b"00" * 64, b"qAttached": b"1", b"qSupported": b"PacketSize=1000"}
    buffer = b""
    with connection:
        while chunk := connection.recv(4096):
            buffer += chunk
            while (match := re.search(rb"\$([^#]*)#..", buffer)) is not None:
                buffer = buffer[match.end():]
                body = match[1]
                reply = next((value for key, value in replies.items() if body.split(b":")[0] == key), b"")
                if body.startswith(b"m"):
                    reply = b"E01"
                connection.sendall(b"+$%s#%02x" % (reply, sum(reply) & 0xFF))


def test_stub_that_is_not_qemu():
    server = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=fake_stub, args=(server,), daemon=True)
    thread.start()
    port = server.getsockname()[1]
    try:
        result = gdb(port, "windump-save x.dmp")
    finally:
        server.close()
    assert [line for line in error_lines(result) if line.startswith("windump-save")] == [
        f"windump-save: gdb://127.0.0.1:{port}: not a QEMU gdbstub (no reply to qqemu.Supported); "
        "windump needs QEMU's physical-memory mode"], result.stderr


def test_not_connected_and_not_importable(tmp_path):
    result = gdb(None, "windump-save x.dmp")
    assert error_lines(result) == [
        "windump-save: gdb is not connected to a gdbstub: run 'target remote HOST:PORT' to QEMU's -gdb port first"]
    missing = gdb(None, "help windump-save", env={"VIRTUAL_ENV": str(tmp_path / "no-venv")})
    lines = error_lines(missing)
    assert lines[0].startswith(f"windump: windump-save not loaded: VIRTUAL_ENV={tmp_path / 'no-venv'} has no lib/python3.")
    assert "Traceback" not in missing.stderr and len([line for line in lines if line.startswith("windump:")]) == 1


def test_standalone_nothing_listening(run_windump, tmp_path):
    port = free_port()
    result = run_windump("save", f"gdb://127.0.0.1:{port}", "x.dmp")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"windump: error: gdb://127.0.0.1:{port}: cannot connect: Connection refused"]


def test_installed_copy_of_the_script(halted, tmp_path):
    """A wheel carries gdb/windump.py; ``windump gdb-script`` prints that copy, and gdb sources it."""
    tree = tmp_path / "tree"
    for name in ("pyproject.toml", "README.md"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tree / name)
    for name in ("windump_plugins", "gdb"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(tree)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    installed = tmp_path / "site"
    with zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))) as wheel:
        wheel.extractall(installed)
    packages = {path.parent.relative_to(REPO).as_posix() for path in (REPO / "windump_plugins").rglob("__init__.py")}
    assert packages <= {path.parent.relative_to(installed).as_posix() for path in installed.rglob("__init__.py")}
    printed = subprocess.run([sys.executable, "-m", "windump_plugins", "gdb-script"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(installed)}, cwd=tmp_path)
    copy = Path(printed.stdout.strip())
    assert copy == installed / "windump_plugins" / "gdb" / "windump.py" and copy.read_bytes() == SCRIPT.read_bytes()
    ours = tmp_path / "installed.dmp"
    result = gdb(halted.qemu.gdb_port, "python import windump_plugins; print(windump_plugins.__file__)",
                 f"windump-save {ours}", script=copy, env={"PYTHONPATH": str(installed)})
    assert str(installed / "windump_plugins" / "__init__.py") in result.stdout, result.stdout + result.stderr
    assert ours.exists(), result.stderr
