"""The dump writer: body bytes against the source, pulled or pushed in any order, through a layout;
kernel-copy fallbacks, progress, writeback, the private 0600 file, and that no failure (source
error, a page missing or twice, Ctrl-C, disk full, existing output) leaves a trace."""

from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest
from gate import unavailable

from windump_plugins import pagecopy, writer
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
from windump_plugins.hookspecs import Layout
from windump_plugins.source import FileExtent, MemorySource
from windump_plugins.writer import DumpWriter, Writeback, write_dump

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
    monkeypatch.setattr(pagecopy, "CHUNK_SIZE", 3 * PAGE_SIZE)
    monkeypatch.setattr(pagecopy, "BUFFER_SIZE", 3 * PAGE_SIZE)
    monkeypatch.setattr(pagecopy, "PROGRESS_INTERVAL", 4 * PAGE_SIZE)


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


@pytest.mark.parametrize("tmpfile", [True, False], ids=["unnamed", "no O_TMPFILE"])
def test_ctrl_c_removes_the_temporary_file_and_propagates(tmp_path, small_chunks, monkeypatch, tmpfile):
    if not tmpfile:
        monkeypatch.setattr(writer, "_TMPFILE", 0)

    def interrupt(done, total):
        if done > total // 2:
            names = os.listdir(tmp_path)
            if tmpfile:
                assert names == []
            else:
                assert any(name.startswith(".out.dmp.windump-") for name in names)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dump(tmp_path / "out.dmp", dump_header(), RUNS, MemoryGuest(), progress=interrupt)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("file_backed", [False, True])
def test_disk_full(tmp_path, small_tmpfs, file_backed):
    """The disk fills once the free space was checked: half the dump fits, then ENOSPC."""
    ram = [[0, 0x80000]]
    runs = np.array([[0, 0x80]], dtype=np.uint64)
    guest = FileGuest(tmp_path / "ram.bin", ram) if file_backed else MemoryGuest(ram)
    output = small_tmpfs / "out.dmp"

    def fill(done, total):
        if done == 0:
            (small_tmpfs / "filler").write_bytes(b"\0" * (0x100000 - 0x40000))

    with pytest.raises(WindumpError, match=rf"^cannot write {output}: No space left on device$"):
        write_dump(output, dump_header(runs), runs, guest, progress=fill)
    guest.close()
    assert os.listdir(small_tmpfs) == ["filler"]


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
    monkeypatch.setattr(writer, "_TMPFILE", 0)  # an unnamed file takes its name by a link
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
    with pytest.raises(WindumpError, match=rf"^cannot write {tmp_path}/out.dmp: it is a directory, not a file"):
        write_dump(tmp_path / "out.dmp", dump_header(), RUNS, MemoryGuest(), force=True)
    assert os.listdir(tmp_path) == ["out.dmp"]


class ReadOnlyGuest(MemoryGuest):
    """Records every call of a MemorySource method that is not a read: the writer must make none."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def reading_done(self) -> None:
        self.calls.append("reading_done")

    def vmcoreinfo(self):
        self.calls.append("vmcoreinfo")

    def cpus(self):
        self.calls.append("cpus")
        return []

    def access(self):
        self.calls.append("access")
        return super().access()

    def close(self) -> None:
        self.calls.append("close")


def test_the_writer_only_reads_the_source(tmp_path, small_chunks):
    guest = ReadOnlyGuest()
    write_dump(tmp_path / "out.dmp", dump_header(), RUNS, guest)
    assert guest.calls == []
    assert (tmp_path / "out.dmp").read_bytes()[X64.size:] == guest.expected_body(RUNS)


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


def test_overlays_leave_every_page_to_the_kernel_copy(tmp_path, monkeypatch):
    """Overlays are written over the copied pages at the end: no page is read through the source."""
    source = FileGuest(tmp_path / "ram.bin")
    read = []
    real_readinto = source.readinto
    monkeypatch.setattr(source, "readinto", lambda address, buffer: (read.append((address, len(buffer))),
                                                                     real_readinto(address, buffer))[-1])
    write_dump(tmp_path / "guest.dmp", dump_header(), RUNS, source, overlays=[(0x150010, b"zz")])
    source.close()
    assert read == []
    patched = MemoryGuest()
    patched.memory = _overlaid(source.memory, [(0x150010, b"zz")])
    assert (tmp_path / "guest.dmp").read_bytes()[X64.size:] == patched.expected_body(RUNS)


@pytest.mark.parametrize("writeback", list(Writeback))
def test_writeback_is_the_callers_choice(tmp_path, small_chunks, monkeypatch, writeback):
    """EAGER starts each chunk's writeback at once (a shorter final fsync); AT_COMMIT leaves it all
    to the fsync, so a source that keeps its guest paused while read has the shortest reads."""
    started = []
    monkeypatch.setattr(pagecopy, "start_writeback", lambda fd, offset, length: started.append((offset, length)))
    write_dump(tmp_path / "out.dmp", dump_header(), RUNS, MemoryGuest(), writeback=writeback)
    if writeback is Writeback.EAGER:
        assert sum(length for _, length in started) == X64.size + body_size(RUNS)
        assert sorted(started)[0] == (0, X64.size)
        # Each chunk once, where it lies in the file: together they tile the file.
        ends = [offset + length for offset, length in sorted(started)]
        assert [offset for offset, _ in sorted(started)][1:] == ends[:-1]
    else:
        assert started == []


# -- pages pushed as (page, bytes), in any order -----------------------------------------------------


def full(runs=RUNS) -> Layout:
    return Layout(dump_header(runs), np.asarray(runs, dtype=np.uint64))


def page_numbers(runs=RUNS) -> list[int]:
    return [page for base, count in np.asarray(runs).tolist() for page in range(base, base + count)]


def push_all(dump: DumpWriter, guest: MemoryGuest, order: list[int], batch: int = 1) -> None:
    """Push the pages ``order`` names, ``batch`` consecutive pages at a time where they follow."""
    i = 0
    while i < len(order):
        n = 1
        while n < batch and i + n < len(order) and order[i + n] == order[i] + n:
            n += 1
        dump.push(order[i], guest.memory[order[i] * PAGE_SIZE:(order[i] + n) * PAGE_SIZE])
        i += n


@pytest.mark.parametrize("seed, batch", [(1, 1), (2, 5), (3, 64)])
def test_pushed_pages_in_any_order_make_the_pulled_dump(tmp_path, seed, batch):
    guest = MemoryGuest()
    overlays = [(0x2FF8, b"B" * 0x20), (0x9FFFF, b"D"), (0x100000 - 0, b"E" * 0x2000)]
    pulled = tmp_path / "pulled.dmp"
    write_dump(pulled, dump_header(), RUNS, guest, overlays=overlays)
    order = page_numbers()
    np.random.default_rng(seed).shuffle(order)
    if batch > 1:  # runs of consecutive pages, shuffled as blocks, some crossing the runs' boundary
        blocks = [page_numbers()[i:i + batch] for i in range(0, len(order), batch)]
        np.random.default_rng(seed).shuffle(blocks)
        order = [page for block in blocks for page in block]
    pushed = tmp_path / "pushed.dmp"
    with DumpWriter(pushed, full(), RUNS, overlays=overlays) as dump:
        push_all(dump, guest, order, batch)
        assert dump.commit() == X64.size + body_size(RUNS)
    assert pushed.read_bytes() == pulled.read_bytes()
    assert pushed.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["pulled.dmp", "pushed.dmp"]


def test_overlays_survive_a_late_page(tmp_path):
    """The page an overlay lies in comes last: the overlay is applied after it, not undone by it."""
    guest = MemoryGuest()
    overlay = (0x150010, b"CONTEXT!")
    order = [page for page in page_numbers() if page != 0x150] + [0x150]
    with DumpWriter(tmp_path / "out.dmp", full(), RUNS, overlays=[overlay]) as dump:
        push_all(dump, guest, order)
        dump.commit()
    patched = MemoryGuest()
    patched.memory = _overlaid(guest.memory, [overlay])
    assert (tmp_path / "out.dmp").read_bytes()[X64.size:] == patched.expected_body(RUNS)


def test_a_page_pushed_twice_is_an_error_and_leaves_nothing(tmp_path):
    guest = MemoryGuest()
    with pytest.raises(WindumpError, match=r"^page 0x101 of the dump was pushed twice$"):
        with DumpWriter(tmp_path / "out.dmp", full(), RUNS) as dump:
            push_all(dump, guest, [0x100, 0x101, 0x102])
            dump.push(0x101, guest.memory[0x101000:0x104000])
    assert os.listdir(tmp_path) == []


def test_a_page_outside_the_runs_is_an_error(tmp_path):
    with pytest.raises(WindumpError, match=r"^physical 0xa0000 is not in the dump's physical-memory runs$"):
        with DumpWriter(tmp_path / "out.dmp", full(), RUNS) as dump:
            dump.push(0x9F, bytes(2 * PAGE_SIZE))  # the last page of run 0, and the hole after it
    assert os.listdir(tmp_path) == []


def test_missing_pages_fail_the_commit(tmp_path):
    guest = MemoryGuest()
    order = [page for page in page_numbers() if page not in (0x5, 0x300)]
    with DumpWriter(tmp_path / "out.dmp", full(), RUNS) as dump:
        push_all(dump, guest, order)
        with pytest.raises(WindumpError, match=r"^0x2 of the dump's 0x3a0 pages were never pushed \(the first: page 0x5\)$"):
            dump.commit()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("length", [0, 100, PAGE_SIZE + 1])
def test_pushed_bytes_come_in_whole_pages(tmp_path, length):
    with pytest.raises(WindumpError, match=r"pages come whole, 0x1000 bytes each$"):
        with DumpWriter(tmp_path / "out.dmp", full(), RUNS) as dump:
            dump.push(0, bytes(length))
    assert os.listdir(tmp_path) == []


def test_a_dump_is_pulled_or_pushed_not_both(tmp_path):
    guest = MemoryGuest()
    with DumpWriter(tmp_path / "a.dmp", full(), RUNS) as dump:
        dump.push(0, guest.memory[:PAGE_SIZE])
        with pytest.raises(RuntimeError, match="either pulled once or pushed"):
            dump.pull(guest)
    with DumpWriter(tmp_path / "b.dmp", full(), RUNS) as dump:
        dump.pull(guest)
        with pytest.raises(RuntimeError, match="either pulled once or pushed"):
            dump.push(0, guest.memory[:PAGE_SIZE])
    assert os.listdir(tmp_path) == []


def test_push_progress_counts_every_page(tmp_path, small_chunks):
    reports = []
    guest = MemoryGuest()
    order = page_numbers()[::-1]
    with DumpWriter(tmp_path / "out.dmp", full(), RUNS, progress=lambda d, t: reports.append((d, t))) as dump:
        push_all(dump, guest, order)
        dump.commit()
    total = X64.size + body_size(RUNS)
    assert reports[0] == (0, total) and reports[-1] == (total, total)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports)


@pytest.mark.parametrize("writeback", list(Writeback))
def test_pushed_pages_start_their_writeback_as_the_caller_asks(tmp_path, small_chunks, monkeypatch, writeback):
    started = []
    monkeypatch.setattr(pagecopy, "start_writeback", lambda fd, offset, length: started.append((offset, length)))
    guest = MemoryGuest()
    with DumpWriter(tmp_path / "out.dmp", full(), RUNS, writeback=writeback) as dump:
        push_all(dump, guest, page_numbers()[::-1])
        dump.commit()
    if writeback is Writeback.EAGER:  # the header, then the whole file every 4 pages pushed
        assert started == [(0, X64.size)] + [(0, 0)] * (0x3A0 // 4)
    else:
        assert started == []


# -- other layouts, as a bitmap format will have them -------------------------------------------------


def shuffled_layout(runs=RUNS) -> Layout:
    """A header with 0x1000 bytes of its own after it, then run 1 before run 0, run 1's pages in two
    pieces swapped: what any output format may ask for."""
    (b0, c0), (b1, c1) = np.asarray(runs).tolist()
    half = c1 // 2
    pages = np.array([[b1 + half, c1 - half], [b1, half], [b0, c0]], dtype=np.uint64)
    return Layout(dump_header(runs) + b"\xEE" * 0x1000, pages)


def laid_out(guest: MemoryGuest, layout: Layout) -> bytes:
    return layout.header + guest.expected_body(layout.pages)


@pytest.mark.parametrize("file_backed", [False, True], ids=["read", "kernel-copy"])
def test_pulled_pages_follow_the_layout(tmp_path, small_chunks, file_backed):
    guest = FileGuest(tmp_path / "ram.bin") if file_backed else MemoryGuest()
    layout = shuffled_layout()
    with DumpWriter(tmp_path / "out.dmp", layout, RUNS, overlays=[(0x150FFE, b"xyzw")]) as dump:
        dump.pull(guest)
        dump.commit()
    guest.close()
    patched = MemoryGuest()
    patched.memory = _overlaid(guest.memory, [(0x150FFE, b"xyzw")])
    assert (tmp_path / "out.dmp").read_bytes() == laid_out(patched, layout)


def test_pushed_pages_follow_the_layout(tmp_path):
    guest = MemoryGuest()
    layout = shuffled_layout()
    order = page_numbers()
    np.random.default_rng(7).shuffle(order)
    with DumpWriter(tmp_path / "out.dmp", layout, RUNS) as dump:
        push_all(dump, guest, order)
        dump.commit()
    assert (tmp_path / "out.dmp").read_bytes() == laid_out(guest, layout)


@pytest.mark.parametrize("pages, placed", [
    ([[0x0, 0xA0], [0x100, 0x2FF]], "0x39f pages, over other page ranges"),  # run 1's last page is missing
    ([[0x0, 0xA0], [0x100, 0x300], [0x3FF, 0x1]], "0x3a1 pages"),  # a page twice
    ([[0x0, 0xA1], [0x100, 0x2FF]], "0x3a0 pages, over other page ranges"),  # one in the hole instead
])
def test_a_layout_must_place_each_page_of_the_runs_once(tmp_path, pages, placed):
    layout = Layout(dump_header(), np.array(pages, dtype=np.uint64))
    with pytest.raises(WindumpError, match=rf"^the dump layout does not place each of the runs' 0x3a0 pages once: "
                                           rf"it places {placed}$"):
        DumpWriter(tmp_path / "out.dmp", layout, RUNS)
    assert os.listdir(tmp_path) == []
