"""The dump writer: body bytes against the source, kernel-copy fallbacks, progress, the private
0600 file, and that no failure (source error, Ctrl-C, disk full, existing output) leaves a trace."""

from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest
from gate import unavailable

from windump_plugins import writer
from windump_plugins.errors import SourceError, WindumpError
from windump_plugins.formats.dumpheader import (
    DUMP_TYPE_FULL,
    PAGE_SIZE,
    X64,
    X86,
    body_size,
    header_bytes,
    new_header,
    set_header_runs,
)
from windump_plugins.source import FileExtent, MemorySource
from windump_plugins.writer import write_dump

#: Guest RAM of the test sources: low memory below the VGA hole, then 3 MiB from 1 MiB.
RAM = [[0x0, 0xA0000], [0x100000, 0x400000]]
RUNS = np.array([[0x0, 0xA0], [0x100, 0x300]], dtype=np.uint64)


class MemoryGuest(MemorySource):
    """Guest RAM in one bytearray indexed by physical address; only ``ram`` is readable."""

    def __init__(self, ram=RAM, seed: int = 1):
        self._ram = np.asarray(ram, dtype=np.uint64).reshape(-1, 2)
        self.memory = bytearray(np.random.default_rng(seed).bytes(int(self._ram[-1, 1])))
        self.description = "memory-guest"

    @property
    def ram(self) -> np.ndarray:
        return self._ram

    def readinto(self, address: int, buffer: memoryview) -> None:
        self.check_range(address, len(buffer))
        buffer[:] = memoryview(self.memory)[address : address + len(buffer)]

    def expected_body(self, runs) -> bytes:
        """The pages of ``runs`` as a full dump must hold them: run after run, in run order."""
        return b"".join(self.memory[b * PAGE_SIZE : (b + c) * PAGE_SIZE] for b, c in np.asarray(runs).tolist())


class FileGuest(MemoryGuest):
    """A MemoryGuest whose RAM ranges also lie packed in a file, served through ``file_extents``."""

    def __init__(self, path, ram=RAM, seed: int = 1):
        super().__init__(ram, seed)
        lengths = self._ram[:, 1] - self._ram[:, 0]
        self.offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.uint64)
        with open(path, "wb") as f:
            for start, end in self._ram.tolist():
                f.write(self.memory[start:end])
        self.file = open(path, "rb")

    def file_extents(self, address: int, length: int) -> list[FileExtent]:
        self.check_range(address, length)
        i = int(np.searchsorted(self._ram[:, 0], np.uint64(address), side="right")) - 1
        return [FileExtent(self.file, int(self.offsets[i]) + address - int(self._ram[i, 0]), length)]

    def close(self) -> None:
        self.file.close()


class FailingGuest(MemoryGuest):
    """Raises SourceError once a read reaches ``fail_at``, as a source losing its guest midway."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at = fail_at

    def readinto(self, address: int, buffer: memoryview) -> None:
        if address + len(buffer) > self.fail_at:
            raise SourceError("memory-guest: the guest went away")
        super().readinto(address, buffer)


def dump_header(runs=RUNS, fmt=X64) -> bytes:
    header = new_header(fmt)
    set_header_runs(header, runs)
    header["DumpType"] = DUMP_TYPE_FULL
    header["RequiredDumpSpace"] = fmt.size + body_size(runs)
    return header_bytes(header)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of three pages and progress every four, so small dumps take many steps."""
    monkeypatch.setattr(writer, "CHUNK_SIZE", 3 * PAGE_SIZE)
    monkeypatch.setattr(writer, "BUFFER_SIZE", 3 * PAGE_SIZE)
    monkeypatch.setattr(writer, "PROGRESS_INTERVAL", 4 * PAGE_SIZE)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs, to run out of space for real; skipped where mounting is not allowed."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode:
        unavailable("cannot mount a tmpfs here")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_writes_header_then_each_run_in_run_order(tmp_path, small_chunks):
    guest = MemoryGuest()
    runs = np.array([[0x200, 0x11], [0x0, 0x5], [0x9F, 0x1], [0x100, 0x7]], dtype=np.uint64)
    header = dump_header(runs)
    output = tmp_path / "out.dmp"
    written = write_dump(output, header, runs, guest)
    data = output.read_bytes()
    assert written == len(data) == X64.size + 0x1E * PAGE_SIZE
    assert data[: X64.size] == header
    assert data[X64.size :] == guest.expected_body(runs)


def test_x86_header_puts_the_body_at_0x1000(tmp_path):
    guest = MemoryGuest()
    header = dump_header(RUNS, X86)
    output = tmp_path / "out.dmp"
    write_dump(output, header, RUNS, guest)
    data = output.read_bytes()
    assert data[:0x1000] == header and data[0x1000:] == guest.expected_body(RUNS)


def test_rejects_a_header_of_the_wrong_size(tmp_path):
    with pytest.raises(WindumpError, match=r"^dump header is 0x1800 bytes, expected 0x2000 or 0x1000$"):
        write_dump(tmp_path / "out.dmp", bytes(0x1800), RUNS, MemoryGuest())
    assert os.listdir(tmp_path) == []


def _spy(monkeypatch, name: str, refuse: int | None = None) -> list[int]:
    """Count calls of ``os.NAME``; with ``refuse``, each call fails with that errno."""
    calls: list[int] = []
    real = getattr(os, name)

    def call(*args):
        calls.append(1)
        if refuse is not None:
            raise OSError(refuse, os.strerror(refuse))
        return real(*args)

    monkeypatch.setattr(os, name, call)
    return calls


@pytest.mark.parametrize("refused", [(), ("copy_file_range",), ("copy_file_range", "sendfile")])
def test_file_backed_source_is_copied_by_the_kernel_or_falls_back(tmp_path, monkeypatch, small_chunks, refused):
    guest = FileGuest(tmp_path / "ram.bin")
    calls = {name: _spy(monkeypatch, name, errno.EXDEV if name in refused else None)
             for name in ("copy_file_range", "sendfile")}
    output = tmp_path / "out.dmp"
    try:
        write_dump(output, dump_header(), RUNS, guest)
    finally:
        guest.close()
    assert output.read_bytes()[X64.size :] == guest.expected_body(RUNS)
    # The first method the kernel accepts does all the work; a refused one is not asked again.
    used = next((name for name in ("copy_file_range", "sendfile") if name not in refused), None)
    for name in ("copy_file_range", "sendfile"):
        if name in refused:
            assert len(calls[name]) == 1
        elif name == used:
            assert len(calls[name]) == -(-0xA0 // 3) - (-0x300 // 3)  # chunks of 3 pages per run
        else:
            assert calls[name] == []


def test_a_file_shorter_than_its_extents_is_a_source_error(tmp_path):
    guest = FileGuest(tmp_path / "ram.bin")
    os.truncate(tmp_path / "ram.bin", 0x50000)
    with pytest.raises(SourceError, match=r"^memory-guest: file ends at 0x50000, before the guest memory"):
        write_dump(tmp_path / "out.dmp", dump_header(), RUNS, guest)
    guest.close()
    assert sorted(os.listdir(tmp_path)) == ["ram.bin"]


def test_progress_reports_start_steps_and_end(tmp_path, small_chunks):
    reports = []
    total = X64.size + 0x3A0 * PAGE_SIZE
    write_dump(tmp_path / "out.dmp", dump_header(), RUNS, MemoryGuest(), progress=lambda d, t: reports.append((d, t)))
    done = [d for d, _ in reports]
    assert {t for _, t in reports} == {total}
    assert done[0] == 0 and done[-1] == total
    assert done == sorted(done)
    gaps = np.diff(done[:-1])
    assert (gaps >= 4 * PAGE_SIZE).all() and (gaps < 7 * PAGE_SIZE + X64.size).all()


@pytest.mark.parametrize("umask", [0, 0o277])
def test_dump_is_mode_0600_whatever_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_dump(tmp_path / "out.dmp", dump_header(), RUNS, MemoryGuest())
    finally:
        os.umask(previous)
    assert (tmp_path / "out.dmp").stat().st_mode & 0o7777 == 0o600


def test_existing_output_needs_force(tmp_path):
    output = tmp_path / "out.dmp"
    output.write_bytes(b"keep me")
    with pytest.raises(WindumpError, match=rf"^{output} exists \(use --force to overwrite\)$"):
        write_dump(output, dump_header(), RUNS, MemoryGuest())
    assert output.read_bytes() == b"keep me"
    assert os.listdir(tmp_path) == ["out.dmp"]
    guest = MemoryGuest()
    write_dump(output, dump_header(), RUNS, guest, force=True)
    assert output.read_bytes()[X64.size :] == guest.expected_body(RUNS)
    assert os.listdir(tmp_path) == ["out.dmp"]


def test_output_that_appears_while_writing_is_not_clobbered(tmp_path):
    output = tmp_path / "out.dmp"

    def meanwhile(done, total):
        if done == total:
            output.write_bytes(b"written by someone else")

    with pytest.raises(WindumpError, match=r"exists \(use --force to overwrite\)$"):
        write_dump(output, dump_header(), RUNS, MemoryGuest(), progress=meanwhile)
    assert output.read_bytes() == b"written by someone else"
    assert os.listdir(tmp_path) == ["out.dmp"]


def test_symlink_at_output_is_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    output = tmp_path / "out.dmp"
    output.symlink_to(victim)
    with pytest.raises(WindumpError, match=r"exists \(use --force to overwrite\)$"):
        write_dump(output, dump_header(), RUNS, MemoryGuest())
    write_dump(output, dump_header(), RUNS, MemoryGuest(), force=True)
    assert not output.is_symlink() and output.stat().st_size == X64.size + 0x3A0 * PAGE_SIZE
    assert victim.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["out.dmp", "victim"]


def test_missing_directory(tmp_path):
    output = tmp_path / "absent" / "out.dmp"
    with pytest.raises(WindumpError, match=rf"^cannot write {output}: No such file or directory$"):
        write_dump(output, dump_header(), RUNS, MemoryGuest())
    assert os.listdir(tmp_path) == []


def test_source_error_midway_leaves_output_as_it_was(tmp_path, small_chunks):
    output = tmp_path / "out.dmp"
    output.write_bytes(b"old dump")
    with pytest.raises(SourceError, match=r"^memory-guest: the guest went away$"):
        write_dump(output, dump_header(), RUNS, FailingGuest(fail_at=0x200000), force=True)
    assert output.read_bytes() == b"old dump"
    assert os.listdir(tmp_path) == ["out.dmp"]


def test_ctrl_c_removes_the_temporary_file_and_propagates(tmp_path, small_chunks):
    def interrupt(done, total):
        if done > total // 2:
            assert any(name.startswith(".out.dmp.windump-") for name in os.listdir(tmp_path))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dump(tmp_path / "out.dmp", dump_header(), RUNS, MemoryGuest(), progress=interrupt)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("file_backed", [False, True])
def test_disk_full(tmp_path, small_tmpfs, file_backed):
    ram = [[0, 0x200000]]
    runs = np.array([[0, 0x200]], dtype=np.uint64)
    guest = FileGuest(tmp_path / "ram.bin", ram) if file_backed else MemoryGuest(ram)
    output = small_tmpfs / "out.dmp"
    with pytest.raises(WindumpError, match=rf"^cannot write {output}: No space left on device$"):
        write_dump(output, dump_header(runs), runs, guest)
    guest.close()
    assert os.listdir(small_tmpfs) == []


def test_read_only_directory(tmp_path, small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    output = small_tmpfs / "out.dmp"
    with pytest.raises(WindumpError, match=rf"^cannot write {output}: Read-only file system$"):
        write_dump(output, dump_header(), RUNS, MemoryGuest())


@pytest.mark.parametrize("existing", [False, True])
def test_without_hard_links_renameat2_keeps_the_no_clobber_promise(tmp_path, monkeypatch, existing):
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    output = tmp_path / "out.dmp"

    def meanwhile(done, total):
        if existing and done == total:
            output.write_bytes(b"written by someone else")

    guest = MemoryGuest()
    if existing:
        with pytest.raises(WindumpError, match=r"exists \(use --force to overwrite\)$"):
            write_dump(output, dump_header(), RUNS, guest, progress=meanwhile)
        assert output.read_bytes() == b"written by someone else"
    else:
        write_dump(output, dump_header(), RUNS, guest)
        assert output.read_bytes()[X64.size :] == guest.expected_body(RUNS)
    assert os.listdir(tmp_path) == ["out.dmp"]


def test_a_short_file_is_caught_before_it_takes_the_name(tmp_path, monkeypatch):
    # A kernel copy that claims success but writes nothing: the final size check must notice.
    monkeypatch.setattr(os, "copy_file_range", lambda src, dst, count, offset: count)
    guest = FileGuest(tmp_path / "ram.bin")
    output = tmp_path / "out.dmp"
    with pytest.raises(WindumpError, match=rf"^cannot write {output}: file is 8192 bytes, expected {X64.size + 0x3A0 * PAGE_SIZE}$"):
        write_dump(output, dump_header(), RUNS, guest)
    guest.close()
    assert os.listdir(tmp_path) == ["ram.bin"]


def test_output_naming_a_directory(tmp_path):
    with pytest.raises(WindumpError, match=rf"^cannot write {tmp_path}/: it names a directory, not a file$"):
        write_dump(f"{tmp_path}/", dump_header(), RUNS, MemoryGuest())
    (tmp_path / "out.dmp").mkdir()
    with pytest.raises(WindumpError, match=rf"^cannot write {tmp_path}/out.dmp: Is a directory$"):
        write_dump(tmp_path / "out.dmp", dump_header(), RUNS, MemoryGuest(), force=True)
    assert os.listdir(tmp_path) == ["out.dmp"]


class PausingGuest(MemoryGuest):
    """Records whether reads happen after ``reading_done``, as a live source resuming its guest."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.fail_at = fail_at
        self.resumed = False
        self.read_after_resume = False

    def readinto(self, address: int, buffer: memoryview) -> None:
        self.read_after_resume |= self.resumed
        if self.fail_at is not None and address + len(buffer) > self.fail_at:
            raise SourceError("memory-guest: the guest went away")
        super().readinto(address, buffer)

    def reading_done(self) -> None:
        self.resumed = True


def test_reading_done_follows_the_last_read(tmp_path, small_chunks):
    guest = PausingGuest()
    write_dump(tmp_path / "out.dmp", dump_header(), RUNS, guest)
    assert guest.resumed and not guest.read_after_resume


def test_reading_done_is_not_announced_when_reading_fails(tmp_path, small_chunks):
    guest = PausingGuest(fail_at=0x200000)
    with pytest.raises(SourceError):
        write_dump(tmp_path / "out.dmp", dump_header(), RUNS, guest)
    assert not guest.resumed


def _overlaid(memory: bytearray, overlays) -> bytearray:
    patched = bytearray(memory)
    for address, data in overlays:
        patched[address:address + len(data)] = data
    return patched


@pytest.mark.parametrize("file_backed", [False, True], ids=["read", "kernel-copy"])
def test_overlays_replace_body_bytes_and_nothing_else(tmp_path, small_chunks, file_backed):
    """Overlays land at their physical addresses: inside a page, across a page boundary, across the
    two runs' boundary-free ends, in a run's first and last byte, and one overlapping another (the
    later wins); every other byte is the guest's, and the guest's memory is untouched."""
    source = FileGuest(tmp_path / "ram.bin") if file_backed else MemoryGuest()
    before = bytes(source.memory)
    overlays = [
        (0x1234, b"A" * 16),
        (0x2FF8, b"B" * 0x20),  # crosses from page 2 into page 3
        (0x0, b"C"),  # the first byte of run 0
        (0x9FFFF, b"D"),  # the last byte of run 0
        (0x100000, b"E" * 0x2000),  # the first two pages of run 1
        (0x3FF000, b"F" * PAGE_SIZE),  # run 1's last page
        (0x1238, b"G" * 4),  # over the first overlay
    ]
    out = tmp_path / "guest.dmp"
    write_dump(out, dump_header(), RUNS, source, overlays=overlays)
    patched = MemoryGuest()
    patched.memory = _overlaid(source.memory, overlays)
    assert out.read_bytes()[X64.size:] == patched.expected_body(RUNS)
    assert bytes(source.memory) == before


def test_overlays_of_pages_both_sides_of_a_run_boundary(tmp_path):
    """Two runs that meet at one physical address: an overlay over the meeting point is split
    between the end of the one and the start of the other, wherever the runs sit in the file."""
    runs = np.array([[0x200, 0x10], [0x100, 0x100]], dtype=np.uint64)  # run 1 ends where run 0 starts
    source = MemoryGuest()
    overlays = [(0x200000 - 8, b"H" * 16)]
    out = tmp_path / "guest.dmp"
    write_dump(out, dump_header(runs), runs, source, overlays=overlays)
    patched = MemoryGuest()
    patched.memory = _overlaid(source.memory, overlays)
    assert out.read_bytes()[X64.size:] == patched.expected_body(runs)


@pytest.mark.parametrize("overlay", [(0xA0000 - 4, b"x" * 8), (0x400000, b"x"), (0xA0000, b"x")],
                         ids=["runs-out-of-run-0", "past-the-last-run", "in-the-hole"])
def test_overlay_outside_the_runs_is_refused_before_writing(tmp_path, overlay):
    out = tmp_path / "guest.dmp"
    with pytest.raises(WindumpError, match="not inside the dump's physical-memory runs"):
        write_dump(out, dump_header(), RUNS, MemoryGuest(), overlays=[overlay])
    assert list(tmp_path.iterdir()) == []


def test_pages_without_overlays_keep_the_kernel_copy(tmp_path, monkeypatch):
    """Only the overlaid page is read through the source; the rest still goes by file extents."""
    source = FileGuest(tmp_path / "ram.bin")
    read = []
    real_readinto = source.readinto
    monkeypatch.setattr(source, "readinto", lambda address, buffer: (read.append((address, len(buffer))),
                                                                     real_readinto(address, buffer))[-1])
    write_dump(tmp_path / "guest.dmp", dump_header(), RUNS, source, overlays=[(0x150010, b"zz")])
    assert read == [(0x150000, PAGE_SIZE)]


def test_writeback_starts_early_except_for_sources_that_resume_after_reading(tmp_path, small_chunks, monkeypatch):
    """Each chunk's writeback starts at once (a shorter final fsync), except for a source that
    resumes its guest after reading: its reads stay short, with writeback left to the end."""
    started = []
    monkeypatch.setattr(writer, "_start_writeback", lambda fd, offset, length: started.append((offset, length)))
    write_dump(tmp_path / "file.dmp", dump_header(), RUNS, MemoryGuest())
    assert sum(length for _, length in started) == X64.size + body_size(RUNS)
    assert sorted(started)[0] == (0, X64.size)

    started.clear()
    live = MemoryGuest()
    live.resumes_after_reading = True
    write_dump(tmp_path / "live.dmp", dump_header(), RUNS, live)
    assert started == []
