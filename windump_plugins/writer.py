"""The dump writer: one crash-dump file from an unnamed file to its final name, its pages
pulled from a source by address or pushed as (page, bytes) in any order, each written where its
output format's layout puts it.

A :class:`DumpWriter` works in phases, so that the caller can tell a live source its reads are done
before the slow part: open (header written), the body (:meth:`~DumpWriter.pull` or
:meth:`~DumpWriter.push`), then :meth:`~DumpWriter.commit`, which applies the *overlays* (bytes
that replace guest bytes at physical addresses in the output only: each processor's CONTEXT, never
written into guest memory) after the last page, so a late page never undoes them, then syncs the
file and links it into place. The file is mode 0600 and appears only complete. It is created
unnamed (``O_TMPFILE``), so nothing of it is left however windump ends, SIGKILL included; where the
file system refuses that, it is a hidden temporary file beside OUTPUT, which leaving the writer
without a commit, on any error or Ctrl-C, removes. :func:`check_output` refuses an OUTPUT the
writer would refuse, for front ends to call before they open a source.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import secrets
import stat
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Self

import numpy as np

from . import pagecopy
from .errors import WindumpError, WindumpWarning
from .formats.dumpheader import PAGE_SIZE
from .hookspecs import Layout
from .outputs.full import full_layout
from .outputs.layout import PageMap
from .pagecopy import PageCopier, Progress, ProgressCallback
from .source import MemorySource

__all__ = ["DumpWriter", "Overlay", "ProgressCallback", "Writeback", "check_output", "write_dump"]

#: ``(physical address, bytes)``: what the output holds there instead of the guest's bytes.
Overlay = tuple[int, bytes]

log = logging.getLogger(__name__)

#: ``O_TMPFILE``, or 0 where the platform has none (then every dump takes a temporary name).
_TMPFILE = getattr(os, "O_TMPFILE", 0)

#: Errors with which ``open(O_TMPFILE)`` says the file system (or kernel) cannot make unnamed files.
_TMPFILE_REFUSED = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})

#: Errors with which ``link`` says the file system has no hard links.
_LINK_UNSUPPORTED = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK})

_RENAME_NOREPLACE = 1

#: The longest file name where the file system does not say (Linux's NAME_MAX).
_NAME_MAX = 255

#: What a file at OUTPUT is, for the kinds that no dump may replace.
_NOT_FILES = ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
              (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"))

#: Free space under this multiple of the dump's size is worth a warning.
_SPACE_MARGIN = 1.1


def check_output(output: str | os.PathLike, *, force: bool, source_paths: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an ``output`` the writer could not or must not write, before a front end opens its
    source (so no live guest is paused for nothing): a name that is a directory, a device node, a
    FIFO or a socket (``force`` or not), one of ``source_paths`` under any spelling, an existing file
    without ``force``, or a directory that is missing, not writable or takes no name that long."""
    target = os.fspath(output)
    directory, name = os.path.split(target)
    if not name:
        raise WindumpError(f"cannot write {target}: it names a directory, not a file")
    try:
        found = os.lstat(target)
    except FileNotFoundError:
        found = None
    except OSError as exc:
        raise WindumpError(f"cannot write {target}: {exc.strerror}") from exc
    if found is not None:
        _refuse_non_file(target, found)
        for source in source_paths:
            if _same_file(found, source):
                raise WindumpError(f"cannot write {target}: it is the source {os.fspath(source)}, "
                                   f"which --force does not replace")
        if not force:
            raise WindumpError(f"{target} exists (use --force to overwrite)")
    parent = directory or "."
    try:
        if not stat.S_ISDIR(os.stat(parent).st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        read_only = os.statvfs(parent).f_flag & os.ST_RDONLY
        name_max = _name_max(parent)
    except OSError as exc:
        raise WindumpError(f"cannot write {target}: {exc.strerror}") from exc
    if read_only:
        raise WindumpError(f"cannot write {target}: {os.strerror(errno.EROFS)}")
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise WindumpError(f"cannot write {target}: {os.strerror(errno.EACCES)}")
    if len(os.fsencode(name)) > name_max:
        raise WindumpError(f"cannot write {target}: {os.strerror(errno.ENAMETOOLONG)}")


def _refuse_non_file(target: str, found: os.stat_result) -> None:
    for is_kind, kind in _NOT_FILES:
        if is_kind(found.st_mode):
            raise WindumpError(f"cannot write {target}: it is a {kind}, not a file (--force replaces only files)")


def _same_file(found: os.stat_result, source: str | os.PathLike) -> bool:
    """Whether the entry at OUTPUT is the file ``source`` names (a symlink at OUTPUT is replaced,
    not followed, so only the entry itself counts)."""
    try:
        other = os.stat(source)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == (other.st_dev, other.st_ino)


def _name_max(directory: str | int) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return _NAME_MAX


class Writeback(enum.Enum):
    """When the dump's bytes start for the disk."""

    #: Chunk by chunk as they are written (POSIX_FADV_DONTNEED): the whole dump is on disk sooner.
    EAGER = "eager"
    #: All at the final fsync: the copy itself is as short as it can be, for sources that keep a
    #: guest paused while they are read.
    AT_COMMIT = "at-commit"


class DumpWriter:
    """A crash dump being written to ``output`` through ``layout``, which must hold each page of
    ``runs`` exactly once; use it as a context manager, and :meth:`commit` it.

    Raises WindumpError before creating anything when the layout or an overlay does not fit the
    runs, :func:`check_output` refuses ``output`` (an existing file is replaced only with ``force``;
    a symlink there is replaced, never followed), or its file system has less room than the dump
    (a WindumpWarning within 10% of it). Every OSError of the file becomes
    ``WindumpError("cannot write OUTPUT: ...")``.
    """

    def __init__(self, output: str | os.PathLike, layout: Layout, runs: np.ndarray, *,
                 overlays: Sequence[Overlay] = (), force: bool = False, progress: ProgressCallback | None = None,
                 writeback: Writeback = Writeback.EAGER):
        self.target = os.fspath(output)
        self.pages = PageMap(layout, runs)
        self.patches = self._check_overlays(overlays)
        self.progress = Progress(progress, self.pages.size)
        self.eager = writeback is Writeback.EAGER
        self.force = force
        self._arrived: np.ndarray | None = None
        self._pulled = False
        self._since_writeback = 0
        self.committed = False
        self.dir_fd = self.fd = -1
        self.temp_name: str | None = None
        directory, self.name = os.path.split(self.target)
        check_output(self.target, force=force)  # again: the front end's check came before a source opened
        try:
            self.dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise WindumpError(f"cannot write {self.target}: {exc.strerror}") from exc
        try:
            _check_space(self.dir_fd, self.target, self.pages.size)
            self.fd = _create_unnamed(self.dir_fd, self.target)
            if self.fd < 0:
                self.temp_name, self.fd = _create_private(self.dir_fd, self.name, self.target)
            with self._file_errors():
                self.progress.report(force=True)
                _pwrite_fully(self.fd, memoryview(layout.header), 0)
                if self.eager:
                    pagecopy.start_writeback(self.fd, 0, len(layout.header))
                self.progress.advance(len(layout.header))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def pull(self, source: MemorySource) -> None:
        """Read every page of the dump from ``source`` (``readinto``, ``file_extents``) and write it, in
        file order: the whole body, in one call."""
        if self._pulled or self._arrived is not None:
            raise RuntimeError("a dump takes its pages either pulled once or pushed")
        self._pulled = True
        with self._file_errors():
            PageCopier(self.fd, source, self.progress, eager=self.eager).copy(self.pages.file_order,
                                                                               self.pages.header_size)
            self.progress.report(force=True)

    def push(self, page: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data``, one or more whole pages of guest memory from page number ``page`` on, where
        the layout puts them. Pages may come in any order; each page of the runs must come exactly
        once (WindumpError for a page twice or outside the runs, and at :meth:`commit` for any
        missing)."""
        if self._pulled:
            raise RuntimeError("a dump takes its pages either pulled once or pushed")
        if self._arrived is None:
            self._arrived = np.zeros(self.pages.page_count, dtype=bool)
        view = memoryview(data).cast("B")
        if not view or len(view) % PAGE_SIZE:
            raise WindumpError(f"{len(view):#x} bytes pushed for page {page:#x}: pages come whole, "
                               f"{PAGE_SIZE:#x} bytes each")
        with self._file_errors():
            for offset, start, count in self.pages.pieces(page * PAGE_SIZE, len(view)):
                first = (offset - self.pages.header_size) // PAGE_SIZE
                arrived = self._arrived[first:first + count // PAGE_SIZE]
                if arrived.any():
                    again = self.pages.page_number(first + int(arrived.argmax()))
                    raise WindumpError(f"page {again:#x} of the dump was pushed twice")
                arrived[:] = True
                _pwrite_fully(self.fd, view[start:start + count], offset)
            self._since_writeback += len(view)
            if self.eager and self._since_writeback >= pagecopy.PROGRESS_INTERVAL:
                # Pushed pages lie anywhere in the file: start the writeback of all it holds so far.
                pagecopy.start_writeback(self.fd, 0, 0)
                self._since_writeback = 0
            self.progress.advance(len(view))
            if self.progress.done == self.progress.total:
                self.progress.report(force=True)

    def commit(self) -> int:
        """Check that every page came, write the overlays, sync the file and give it its final name;
        return its size. The writer is closed afterwards, whatever happened."""
        try:
            if not self._pulled:
                self._check_arrived()
            with self._file_errors():
                for offset, data in self.patches:
                    _pwrite_fully(self.fd, memoryview(data), offset)
                size = os.fstat(self.fd).st_size
                if size != self.pages.size:
                    raise WindumpError(f"cannot write {self.target}: file is {size} bytes, expected {self.pages.size}")
                os.fsync(self.fd)
                if self.temp_name is None:
                    self._link_unnamed()
                else:
                    _install(self.dir_fd, self.temp_name, self.name, self.target, self.force)
                os.fsync(self.dir_fd)
            self.committed = True
        finally:
            self.close()
        return self.pages.size

    def close(self) -> None:
        """Release the file; without a commit, remove its temporary name if it has one (an unnamed
        file goes with its descriptor; the target is left as it was)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            if not self.committed and self.temp_name is not None:
                _remove(self.dir_fd, self.temp_name)
            os.close(self.dir_fd)
            self.dir_fd = -1

    def _link_unnamed(self) -> None:
        """Give the complete unnamed file its final name: without ``force`` a link that fails if
        OUTPUT appeared meanwhile; with it, a link to a temporary name renamed over OUTPUT."""
        unnamed = f"/proc/self/fd/{self.fd}"
        if not self.force:
            try:
                os.link(unnamed, self.name, dst_dir_fd=self.dir_fd, follow_symlinks=True)
            except FileExistsError:
                raise WindumpError(f"{self.target} exists (use --force to overwrite)") from None
            return
        name_max = _name_max(self.dir_fd)
        for _ in range(16):
            temp_name = _temp_name(self.name, name_max)
            try:
                os.link(unnamed, temp_name, dst_dir_fd=self.dir_fd, follow_symlinks=True)
            except FileExistsError:
                continue
            self.temp_name = temp_name  # close() removes it unless the rename below happens
            _install(self.dir_fd, temp_name, self.name, self.target, force=True)
            return
        raise WindumpError(f"cannot write {self.target}: no free temporary name beside it")

    def _check_arrived(self) -> None:
        arrived = self._arrived if self._arrived is not None else np.zeros(self.pages.page_count, dtype=bool)
        missing = np.flatnonzero(~arrived)
        if missing.size:
            first = self.pages.page_number(int(missing[0]))
            raise WindumpError(f"{missing.size:#x} of the dump's {arrived.size:#x} pages were never pushed "
                               f"(the first: page {first:#x})")

    def _check_overlays(self, overlays: Sequence[Overlay]) -> list[Overlay]:
        """``(file offset, bytes)`` of each non-empty overlay, after checking that it lies in the
        runs (so none is silently lost); later overlays come later, so they win where they overlap."""
        patches = []
        for address, data in overlays:
            if not data:
                continue
            try:
                pieces = self.pages.pieces(address, len(data))
            except WindumpError:
                raise WindumpError(f"overlay at physical {address:#x}-{address + len(data):#x} is not inside the "
                                   f"dump's physical-memory runs, so the dump cannot hold it") from None
            patches += [(offset, bytes(data[start:start + count])) for offset, start, count in pieces]
        return patches

    @contextmanager
    def _file_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise WindumpError(f"cannot write {self.target}: {exc.strerror or exc}") from exc


def write_dump(output: str | os.PathLike, header: bytes, runs: np.ndarray, source: MemorySource, *,
               force: bool = False, progress: ProgressCallback | None = None, overlays: Sequence[Overlay] = (),
               writeback: Writeback = Writeback.EAGER) -> int:
    """Write a full dump in one call: ``header`` then the pages of each ``[BasePage, PageCount]`` run of
    ``source``, each overlay's bytes in place of the guest's at its physical address; return the bytes
    written (see :class:`DumpWriter` for the rules of the file)."""
    runs = np.asarray(runs, dtype=np.uint64).reshape(-1, 2)
    with DumpWriter(output, full_layout(header, runs), runs, overlays=overlays, force=force, progress=progress,
                    writeback=writeback) as dump:
        dump.pull(source)
        return dump.commit()


def _pwrite_fully(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _check_space(dir_fd: int, target: str, size: int) -> None:
    """Refuse a dump of ``size`` bytes that its file system has no room for, before the first byte;
    warn when it leaves less than a tenth to spare (a file system that counts no blocks is not
    judged)."""
    found = os.fstatvfs(dir_fd)
    if not found.f_blocks:
        return
    free = found.f_bavail * found.f_frsize
    if free < size:
        raise WindumpError(f"cannot write {target}: the dump needs {size} bytes, its file system has {free} free")
    if free < size * _SPACE_MARGIN:
        warnings.warn(f"{target}: the dump takes {size} of the {free} bytes free on its file system",
                      WindumpWarning, stacklevel=3)


def _temp_name(name: str, name_max: int) -> str:
    """``.NAME.windump-XXXX.tmp``, or ``.windump-XXXXXXXXXXXXXXXX.tmp`` where NAME is too long for that."""
    temp_name = f".{name}.windump-{secrets.token_hex(4)}.tmp"
    if len(os.fsencode(temp_name)) <= name_max:
        return temp_name
    return f".windump-{secrets.token_hex(8)}.tmp"


def _create_unnamed(dir_fd: int, target: str) -> int:
    """Create an unnamed file (``O_TMPFILE``) in the directory ``dir_fd``, mode 0600; -1 where the
    file system refuses it, or where ``/proc`` is missing, through which it is given its name."""
    if not _TMPFILE:
        return -1
    try:
        fd = os.open(".", _TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _TMPFILE_REFUSED:
            log.info("%s: the file system makes no unnamed files (%s); writing a temporary file beside it",
                     target, exc.strerror)
            return -1
        raise WindumpError(f"cannot write {target}: {exc.strerror}") from exc
    if not os.path.exists(f"/proc/self/fd/{fd}"):
        os.close(fd)
        log.info("%s: no /proc to link an unnamed file through; writing a temporary file beside it", target)
        return -1
    os.fchmod(fd, 0o600)  # the umask cannot widen 0600, but it can narrow it
    log.info("%s: writing an unnamed file (O_TMPFILE), linked at the end", target)
    return fd


def _create_private(dir_fd: int, name: str, target: str) -> tuple[str, int]:
    """Create a temporary name (:func:`_temp_name`) beside the target, exclusively and mode 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    name_max = _name_max(dir_fd)
    for _ in range(16):
        temp_name = _temp_name(name, name_max)
        try:
            fd = os.open(temp_name, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
        except OSError as exc:
            raise WindumpError(f"cannot write {target}: {exc.strerror}") from exc
        os.fchmod(fd, 0o600)  # the umask cannot widen 0600, but it can narrow it
        return temp_name, fd
    raise WindumpError(f"cannot write {target}: no free temporary name beside it")


def _install(dir_fd: int, temp_name: str, name: str, target: str, force: bool) -> None:
    """Give the complete temporary file its final name; without ``force``, never over a file that
    appeared meanwhile, and never over anything but a file."""
    if force:
        try:
            _refuse_non_file(target, os.lstat(name, dir_fd=dir_fd))
        except FileNotFoundError:
            pass
        os.replace(temp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    try:
        os.link(temp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise WindumpError(f"{target} exists (use --force to overwrite)") from None
    except OSError as exc:
        if exc.errno not in _LINK_UNSUPPORTED:
            raise
        _rename_noreplace(dir_fd, temp_name, name, target)
    else:
        os.unlink(temp_name, dir_fd=dir_fd)


def _rename_noreplace(dir_fd: int, temp_name: str, name: str, target: str) -> None:
    """``renameat2(RENAME_NOREPLACE)``, for file systems without hard links (vfat, exFAT)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(dir_fd, temp_name.encode(), dir_fd, name.encode(), _RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise WindumpError(f"{target} exists (use --force to overwrite)")
    raise OSError(err, os.strerror(err))


def _remove(dir_fd: int, temp_name: str) -> None:
    try:
        os.unlink(temp_name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
