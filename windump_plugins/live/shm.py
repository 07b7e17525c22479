"""Guest RAM in QEMU's shared-memory backends (``memory-backend-file`` with ``share=on``), found
through QMP and mapped read-only: RAM at memory speed, and file extents the writer copies in the
kernel. RAM blocks in no such backend are read by another reader (QEMU's process memory)."""

from __future__ import annotations

import contextlib
import logging
import mmap
from collections.abc import Callable, Sequence
from typing import BinaryIO

from ..source import FileExtent
from .hmp import RamRegion, ram_layout
from .layers import PathUnavailable, RamReader
from .qmp import QmpConnection
from .samehost import check_first_page

log = logging.getLogger(__name__)


class SharedMemoryRam(RamReader):
    """RAM regions read from mapped backend files (``mapped``, by backend id), the others through
    ``rest``; what ``stack`` holds is released on :meth:`close`."""

    name = "shm"

    def __init__(self, regions: Sequence[RamRegion], mapped: dict[str, tuple[BinaryIO, memoryview]],
                 rest: RamReader | None, stack: contextlib.ExitStack) -> None:
        super().__init__(ram_layout(regions))
        self._regions = list(regions)
        self._mapped = mapped
        self._rest = rest
        self._stack = stack

    def readinto(self, address: int, view: memoryview) -> None:
        for index, offset, inside, length in self.layout.split(address, len(view)):
            region = self._regions[index]
            backend = self._mapped.get(region.block)
            if backend is None:
                assert self._rest is not None  # regions nothing reads are not in the layout
                self._rest.readinto(region.start + inside, view[offset : offset + length])
            else:
                base = region.offset + inside
                view[offset : offset + length] = backend[1][base : base + length]

    def file_extents(self, address: int, length: int) -> list[FileExtent] | None:
        extents = []
        for index, _, inside, piece in self.layout.split(address, length):
            region = self._regions[index]
            backend = self._mapped.get(region.block)
            if backend is None:
                return None
            extents.append(FileExtent(backend[0], region.offset + inside, piece))
        return extents

    def close(self) -> None:
        self._stack.close()


def open_shared_memory(qmp: QmpConnection, regions: Sequence[RamRegion], *,
                       rest: Callable[[list[RamRegion]], RamReader], trusted: Callable[[int, int], bytes],
                       whose: str) -> SharedMemoryRam:
    """A reader of the regions in shared backends, and of the others through ``rest`` (when that
    opens; else they are left out of RAM), checked against ``trusted`` like the same-host path."""
    stack = contextlib.ExitStack()
    try:
        mapped = _map_backends(qmp, stack)
        inside = [region for region in regions if region.block in mapped]
        outside = [region for region in regions if region.block not in mapped]
        if not inside:
            raise PathUnavailable(f"no RAM region lies in a shared backend ({', '.join(sorted(mapped))})")
        other = None
        if outside:
            try:
                other = stack.enter_context(contextlib.closing(rest(outside)))
            except PathUnavailable as why:
                log.info("%s: left out of guest RAM, in no shared backend: %s (%s)", qmp.description,
                         ", ".join(f"{region.block} at {region.start:#x}" for region in outside), why)
        kept = sorted(inside + (outside if other is not None else []))
        reader = SharedMemoryRam(kept, mapped, other, stack)
        check_first_page(reader, trusted, whose)
        return reader
    except BaseException:
        stack.close()
        raise


def _map_backends(qmp: QmpConnection, stack: contextlib.ExitStack) -> dict[str, tuple[BinaryIO, memoryview]]:
    """Every ``memory-backend-file,share=on`` by id, open and mapped read-only (``stack`` closes them)."""
    backends = [child["name"] for child in qmp.execute("qom-list", path="/objects")
                if child["type"] == "child<memory-backend-file>"]
    if not backends:
        raise PathUnavailable("no memory-backend-file RAM backend (see -object memory-backend-file,share=on)")
    opened: dict[str, tuple[BinaryIO, memoryview]] = {}
    problems: list[str] = []
    for name in backends:
        path = f"/objects/{name}"
        mem_path = qmp.execute("qom-get", path=path, property="mem-path")
        size = int(qmp.execute("qom-get", path=path, property="size"))
        if not qmp.execute("qom-get", path=path, property="share"):
            problems.append(f"backend {name} has share=off, so {mem_path} does not hold guest writes")
            continue
        try:
            file = stack.enter_context(open(mem_path, "rb", buffering=0))  # noqa: SIM115 (the stack closes it)
        except OSError as error:
            problems.append(f"cannot open {mem_path} of backend {name}: {error.strerror}")
            continue
        try:
            mapping = stack.enter_context(mmap.mmap(file.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ))
        except (OSError, ValueError) as error:
            problems.append(f"cannot map {mem_path} of backend {name}: {getattr(error, 'strerror', None) or error}")
            continue
        memory = memoryview(mapping)
        stack.callback(memory.release)  # before the mapping closes
        opened[name] = (file, memory)
    if not opened:
        raise PathUnavailable("; ".join(problems))
    return opened
