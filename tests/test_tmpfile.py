"""The dump is written unnamed (``O_TMPFILE``) and linked into place at the end, so nothing of it
is left however windump ends, SIGKILL included; where the file system refuses unnamed files, a
hidden temporary file beside OUTPUT takes its place."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import dumpfiles
import pytest
from corpus import BUILT_IN_PLUGINS
from windump_plugins import writer
from windump_plugins.errors import WindumpError
from windump_plugins.formats.dumpheader import X64

from test_writer import RUNS, MemoryGuest, dump_header

#: A sample guest whose body takes long enough to write that a signal lands midway.
SAMPLE_RAM = 512 << 20


def named_while_writing(output, force=False) -> tuple[set[str], bytes]:
    """Write a small dump to ``output``; return every name seen beside it while it was written."""
    seen: set[str] = set()
    guest = MemoryGuest()
    writer.write_dump(output, dump_header(), RUNS, guest, force=force,
                      progress=lambda done, total: seen.update(os.listdir(output.parent)))
    return seen, guest.expected_body(RUNS)


def test_the_dump_has_no_name_until_it_is_complete(tmp_path):
    output = tmp_path / "out.dmp"
    seen, body = named_while_writing(output)
    assert seen == set()
    assert output.read_bytes()[X64.size:] == body
    assert output.stat().st_mode & 0o7777 == 0o600 and output.stat().st_nlink == 1
    assert os.listdir(tmp_path) == ["out.dmp"]


def test_force_links_a_temporary_name_for_one_rename(tmp_path):
    output = tmp_path / "out.dmp"
    output.write_bytes(b"old dump")
    seen, body = named_while_writing(output, force=True)
    assert seen == {"out.dmp"}  # the temporary name lives only between link and rename
    assert output.read_bytes()[X64.size:] == body
    assert os.listdir(tmp_path) == ["out.dmp"]


@pytest.mark.parametrize("length", [233, 234, 255])
def test_force_with_a_long_name(tmp_path, length):
    if os.pathconf(tmp_path, "PC_NAME_MAX") != 255:
        pytest.skip("the test's file system does not take names of 255 bytes")
    output = tmp_path / ("d" * (length - 4) + ".dmp")
    output.write_bytes(b"old dump")
    seen, body = named_while_writing(output, force=True)
    assert output.read_bytes()[X64.size:] == body
    assert os.listdir(tmp_path) == [output.name]


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL],
                         ids=lambda number: errno.errorcode[number])
def test_a_file_system_without_o_tmpfile_gets_a_temporary_file(tmp_path, monkeypatch, refusal):
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if flags & writer._TMPFILE == writer._TMPFILE:
            raise OSError(refusal, os.strerror(refusal))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    output = tmp_path / "out.dmp"
    seen, body = named_while_writing(output)
    assert len(seen) == 1 and seen.pop().startswith(".out.dmp.windump-")
    assert output.read_bytes()[X64.size:] == body
    assert output.stat().st_mode & 0o7777 == 0o600
    assert os.listdir(tmp_path) == ["out.dmp"]


def test_another_o_tmpfile_error_is_a_write_error(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if flags & writer._TMPFILE == writer._TMPFILE:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    output = tmp_path / "out.dmp"
    with pytest.raises(WindumpError, match=rf"^cannot write {output}: Disk quota exceeded$"):
        writer.write_dump(output, dump_header(), RUNS, MemoryGuest())
    assert os.listdir(tmp_path) == []


def test_sigkill_mid_body_leaves_nothing(tmp_path):
    """Stopped once its dump file holds part of the body, then killed: no name, hidden or not."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("WINDUMP_")}
    environ["WINDUMP_PLUGINS"] = BUILT_IN_PLUGINS
    process = subprocess.Popen([sys.executable, "-m", "windump_plugins", "save", f"sample:?ram={SAMPLE_RAM}",
                                "guest.dmp"], cwd=tmp_path, env=environ, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    size = dumpfiles.stop_midway(process, tmp_path, 64 << 20)
    process.kill()
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert size < SAMPLE_RAM, "killed too late to be midway"
    assert os.listdir(tmp_path) == []
