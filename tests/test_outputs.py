"""OUTPUT is checked before any source opens (so no live guest is paused for a file that cannot be
written): what is not a file, the source itself, an existing file without --force, a directory that
cannot take it; names up to NAME_MAX work; the free space is checked before the first byte."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import tempfile
import warnings

import numpy as np
import pytest
from gate import unavailable
from test_writer import RUNS, MemoryGuest, dump_header, small_tmpfs  # noqa: F401 (a fixture)

from windump_plugins.errors import WindumpError, WindumpWarning
from windump_plugins.formats.dumpheader import PAGE_SIZE, X64
from windump_plugins.frontends import cli
from windump_plugins.frontends.gdb import Settings, save_in_gdb
from windump_plugins.hookspecs import hookimpl
from windump_plugins.plugins import Plugins
from windump_plugins import writer
from windump_plugins.writer import check_output, write_dump

NOT_A_FILE = r"it is a {}, not a file \(--force replaces only files\)$"


def device_node(path) -> str:
    """A character device like /dev/null at ``path`` (so a failing test cannot replace the real one)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        unavailable("cannot make a device node here (not root)")
    return str(path)


def not_a_file(tmp_path, kind: str) -> str:
    path = tmp_path / "out.dmp"
    if kind == "directory":
        path.mkdir()
    elif kind == "character device":
        device_node(path)
    elif kind == "FIFO":
        os.mkfifo(path)
    else:
        listening = socket.socket(socket.AF_UNIX)
        listening.bind(str(path))
        listening.close()
    return str(path)


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("kind", ["directory", "character device", "FIFO", "socket"])
def test_what_is_not_a_file_is_refused_force_or_not(tmp_path, kind, force):
    output = not_a_file(tmp_path, kind)
    with pytest.raises(WindumpError, match=rf"^cannot write {output}: " + NOT_A_FILE.format(kind)):
        check_output(output, force=force)
    with pytest.raises(WindumpError, match=rf"^cannot write {output}: " + NOT_A_FILE.format(kind)):
        write_dump(output, dump_header(), RUNS, MemoryGuest(), force=force)
    assert os.listdir(tmp_path) == ["out.dmp"]
    assert not stat.S_ISREG(os.lstat(output).st_mode)


def test_dev_null_is_refused_with_force():
    with pytest.raises(WindumpError, match=rf"^cannot write {os.devnull}: " + NOT_A_FILE.format("character device")):
        check_output(os.devnull, force=True)


def test_a_device_node_appearing_before_the_commit_is_not_replaced(tmp_path):
    output = tmp_path / "out.dmp"

    def meanwhile(done, total):
        if done == total and not output.exists():
            device_node(output)

    with pytest.raises(WindumpError, match=NOT_A_FILE.format("character device")):
        write_dump(output, dump_header(), RUNS, MemoryGuest(), force=True, progress=meanwhile)
    assert stat.S_ISCHR(os.lstat(output).st_mode)
    assert os.listdir(tmp_path) == ["out.dmp"]


def test_existing_file_without_force_and_directories_that_cannot_take_it(tmp_path):
    (tmp_path / "old.dmp").write_bytes(b"keep")
    with pytest.raises(WindumpError, match=rf"^{tmp_path}/old.dmp exists \(use --force to overwrite\)$"):
        check_output(tmp_path / "old.dmp", force=False)
    check_output(tmp_path / "old.dmp", force=True)
    check_output(tmp_path / "new.dmp", force=False)
    with pytest.raises(WindumpError, match=rf"^cannot write {tmp_path}/absent/out.dmp: No such file or directory$"):
        check_output(tmp_path / "absent" / "out.dmp", force=True)
    with pytest.raises(WindumpError, match=rf"^cannot write {tmp_path}/old.dmp/out.dmp: Not a directory$"):
        check_output(tmp_path / "old.dmp" / "out.dmp", force=True)
    with pytest.raises(WindumpError, match=rf"^cannot write {tmp_path}/: it names a directory, not a file$"):
        check_output(f"{tmp_path}/", force=True)
    assert (tmp_path / "old.dmp").read_bytes() == b"keep"


def test_a_read_only_directory_is_refused_before_writing(small_tmpfs):  # noqa: F811 (the fixture)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(WindumpError, match=rf"^cannot write {small_tmpfs}/out.dmp: Read-only file system$"):
        check_output(small_tmpfs / "out.dmp", force=True)


def test_a_directory_the_user_may_not_write_is_refused():
    with tempfile.TemporaryDirectory() as place:  # in /tmp, which any user may enter
        os.chmod(place, 0o755)
        locked = os.path.join(place, "locked")
        os.mkdir(locked, 0o555)
        root = os.geteuid() == 0
        if root:  # root writes anywhere: check as nobody
            os.seteuid(65534)
        try:
            with pytest.raises(WindumpError, match=rf"^cannot write {locked}/out.dmp: Permission denied$"):
                check_output(os.path.join(locked, "out.dmp"), force=False)
        finally:
            if root:
                os.seteuid(0)


def test_output_that_is_the_source_is_refused_under_any_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "g.elf").write_bytes(b"the only ELF")
    os.link(tmp_path / "v" / "g.elf", tmp_path / "hard.elf")
    (tmp_path / "link.elf").symlink_to(tmp_path / "v" / "g.elf")
    for spelling in ("./v/../v/g.elf", str(tmp_path / "v" / "g.elf"), "hard.elf"):
        with pytest.raises(WindumpError, match=rf"^cannot write {spelling}: it is the source v/g.elf, "
                                               r"which --force does not replace$"):
            check_output(spelling, force=True, source_paths=["v/g.elf"])
    # A symlink at OUTPUT is replaced, never followed: the source is safe, so that is allowed.
    check_output("link.elf", force=True, source_paths=["v/g.elf"])
    check_output("other.dmp", force=True, source_paths=["v/g.elf"])
    assert (tmp_path / "v" / "g.elf").read_bytes() == b"the only ELF"


class Spy:
    """A source plugin that records every location it is asked to open, and opens none."""

    def __init__(self):
        self.asked: list[str] = []

    @hookimpl
    def windump_open_location(self, location):
        self.asked.append(location)


@pytest.fixture
def spied_cli(monkeypatch):
    """``cli.main`` with only the Spy plugin, and the Spy."""
    spy, plugins = Spy(), Plugins()
    plugins.register(spy, "spy")
    monkeypatch.setattr(cli, "load_plugins", lambda: plugins)
    try:
        yield cli.main, spy
    finally:
        plugins.unregister("spy")


def test_cli_refuses_outputs_before_opening_the_source(spied_cli, capsys, tmp_path, monkeypatch):
    main, spy = spied_cli
    monkeypatch.chdir(tmp_path)
    node = device_node(tmp_path / "null")
    (tmp_path / "old.dmp").write_bytes(b"keep")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "g.elf").write_bytes(b"the only ELF")
    refusals = {
        (node, "--force"): f"cannot write {node}: it is a character device, not a file (--force replaces only files)",
        (str(tmp_path),): f"cannot write {tmp_path}: it is a directory, not a file (--force replaces only files)",
        ("old.dmp",): "old.dmp exists (use --force to overwrite)",
        ("absent/out.dmp",): "cannot write absent/out.dmp: No such file or directory",
    }
    for arguments, error in refusals.items():
        assert main(["save", "qmp:/run/vm.sock", *arguments]) == 1
        assert capsys.readouterr().err == f"windump: error: {error}\n"
    for source in ("v/g.elf", "elf:v/g.elf?x=1"):
        assert main(["save", source, "./v/../v/g.elf", "--force"]) == 1
        assert capsys.readouterr().err == ("windump: error: cannot write ./v/../v/g.elf: it is the source v/g.elf, "
                                           "which --force does not replace\n")
    assert spy.asked == []
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    assert (tmp_path / "old.dmp").read_bytes() == b"keep"
    assert (tmp_path / "v" / "g.elf").read_bytes() == b"the only ELF"


def test_gdb_command_refuses_outputs_before_using_the_connection(tmp_path):
    """Outside gdb, using the connection fails at once: these refusals come before it."""
    node = device_node(tmp_path / "null")
    with pytest.raises(WindumpError, match=rf"^cannot write {node}: " + NOT_A_FILE.format("character device")):
        save_in_gdb(["--force", node], Settings(), write=print, terminal=False)
    (tmp_path / "old.dmp").write_bytes(b"keep")
    with pytest.raises(WindumpError, match=r"old.dmp exists \(use --force to overwrite\)$"):
        save_in_gdb([str(tmp_path / "old.dmp")], Settings(), write=print, terminal=False)
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_names_up_to_name_max_work(tmp_path, monkeypatch):
    """Through the named temporary file (where O_TMPFILE is refused), whose long name must shrink."""
    monkeypatch.setattr(writer, "_TMPFILE", 0)
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    if name_max != 255:
        unavailable(f"the test's file system takes names of {name_max} bytes, not 255")
    seen = []
    for length in (233, 234, 255):
        output = tmp_path / ("d" * (length - 4) + ".dmp")
        guest = MemoryGuest()
        write_dump(output, dump_header(), RUNS, guest, progress=lambda done, total: seen.append(os.listdir(tmp_path)))
        assert output.read_bytes()[X64.size:] == guest.expected_body(RUNS)
        assert os.stat(output).st_mode & 0o777 == 0o600
        assert os.listdir(tmp_path) == [output.name]
        output.unlink()
    temporaries = {name for names in seen for name in names} - {output.name}
    assert temporaries and all(name.startswith(".") and name.endswith(".tmp") for name in temporaries)
    too_long = tmp_path / ("d" * 252 + ".dmp")
    with pytest.raises(WindumpError, match=rf"^cannot write {too_long}: File name too long$"):
        check_output(too_long, force=False)
    with pytest.raises(WindumpError, match=rf"^cannot write {too_long}: File name too long$"):
        write_dump(too_long, dump_header(), RUNS, MemoryGuest())
    assert os.listdir(tmp_path) == []


def runs_of(size: int) -> np.ndarray:
    """Runs whose full dump is about ``size`` bytes (within MemoryGuest's RAM)."""
    return np.array([[0x100, (size - X64.size) // PAGE_SIZE]], dtype=np.uint64)


def test_free_space_below_the_dump_is_an_error_before_the_first_byte(small_tmpfs):  # noqa: F811
    found = os.statvfs(small_tmpfs)
    free = found.f_bavail * found.f_frsize
    runs = runs_of(free + 2 * PAGE_SIZE)
    size = X64.size + int(runs[0, 1]) * PAGE_SIZE
    progress = []
    output = small_tmpfs / "out.dmp"
    with pytest.raises(WindumpError, match=rf"^cannot write {output}: the dump needs {size} bytes, "
                                           rf"its file system has {free} free$"):
        write_dump(output, dump_header(runs), runs, MemoryGuest(), progress=lambda *step: progress.append(step))
    assert progress == [] and os.listdir(small_tmpfs) == []


def test_free_space_within_a_tenth_of_the_dump_is_a_warning(small_tmpfs):  # noqa: F811
    found = os.statvfs(small_tmpfs)
    free = found.f_bavail * found.f_frsize
    for share, warned in ((0.95, True), (0.8, False)):
        runs = runs_of(int(free * share))
        size = X64.size + int(runs[0, 1]) * PAGE_SIZE
        output = small_tmpfs / "out.dmp"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert write_dump(output, dump_header(runs), runs, MemoryGuest()) == size
        messages = [str(w.message) for w in caught if issubclass(w.category, WindumpWarning)]
        expected = [f"{output}: the dump takes {size} of the {free} bytes free on its file system"]
        assert messages == (expected if warned else [])
        output.unlink()

