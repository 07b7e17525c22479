"""The FIFOs QEMU writes its dumps into when the monitor is on TCP: private, unpredictable, and no
way in for another user (``windump_plugins.live.qmpdump``)."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys

import pytest
from elfmaker import TinyGuest
from qmpfake import FakeQemu

from windump_plugins.live.qmp import QmpConnection
from windump_plugins.live.qmpdump import GuestMemoryDumps, fifo_modes

NOBODY = 65534


@pytest.fixture
def dumps(tmp_path):
    """GuestMemoryDumps over a connection to a stand-in QEMU (this process, so QEMU's user is ours)."""
    qemu = FakeQemu(tmp_path, TinyGuest([(0, 0x100000)], seed=3))
    connection = QmpConnection(qemu.path, timeout=5, description="qmp:test")
    made = GuestMemoryDumps(connection)
    yield made
    made.close()
    connection.close()
    qemu.close()


def test_fifos_are_0600_in_a_0700_directory_with_random_names(dumps):
    made = [dumps._fifo() for _ in range(3)]
    try:
        directory = os.path.dirname(made[0][0])
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        names = [os.path.basename(path) for path, _ in made]
        assert len(set(names)) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", name) for name in names)
        for path, _ in made:
            status = os.stat(path)
            assert stat.S_ISFIFO(status.st_mode) and stat.S_IMODE(status.st_mode) == 0o600
            assert (status.st_uid, status.st_gid) == (os.geteuid(), os.getegid())
    finally:
        for _, read_fd in made:
            os.close(read_fd)
    dumps.close()
    assert not os.path.exists(directory)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as user nobody")
def test_another_user_cannot_open_a_fifo(dumps):
    """User nobody can neither write into (forge guest memory) nor hold open a FIFO of ours."""
    path, read_fd = dumps._fifo()
    try:
        probe = (f"import os, sys\nos.setgid({NOBODY}); os.setuid({NOBODY})\n"
                 "try:\n    os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK)\n"
                 "except OSError as error:\n    print(error.errno)\nelse:\n    print(0)\n")
        result = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == str(errno.EACCES), result.stderr
    finally:
        os.close(read_fd)


def test_fifo_modes_are_the_narrowest_qemus_user_can_open():
    assert fifo_modes(os.geteuid(), os.getegid()) == (0o700, 0o600, None)
    if os.geteuid() == 0:  # QEMU as libvirt-qemu, say: the FIFO and its directory become its own
        assert fifo_modes(NOBODY, NOBODY) == (0o700, 0o600, (NOBODY, NOBODY))
    else:  # we cannot give a file away: only the write bit for others, under a name nobody lists
        assert fifo_modes(os.geteuid() + 1, 0) == (0o711, 0o602, None)
