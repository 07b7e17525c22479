"""The same-host fast path, for ``gdb://`` and ``qmp:`` alike: guest RAM read from QEMU's own
process memory at the addresses ``gpa2hva`` names, trusted once its first page agrees with a read
made through QEMU."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import SourceError
from ..formats.dumpheader import PAGE_SIZE
from .hmp import RamRegion, parse_host_address, ram_layout
from .layers import PathUnavailable, RamReader
from .procmem import ProcessMemory


class ProcessRam(RamReader):
    """RAM regions read from QEMU's process memory, each at its host address: ``process_vm_readv``
    straight into the caller's buffer, with no copy of ours.

    When a read fails because QEMU is gone, the error says so and ``on_quit`` is told (a QMP
    connection then knows it has no QEMU left to talk to).
    """

    name = "procmem"

    def __init__(self, process: ProcessMemory, regions: Sequence[RamRegion], hosts: Sequence[int], *,
                 description: str, on_quit: Callable[[], None] | None = None) -> None:
        super().__init__(ram_layout(regions))
        self.process = process
        self.description = description
        self._hosts = list(hosts)
        self._on_quit = on_quit

    @property
    def pid(self) -> int:
        return self.process.pid

    def readinto(self, address: int, view: memoryview) -> None:
        try:
            for region, offset, inside, length in self.layout.split(address, len(view)):
                self.process.readinto(self._hosts[region] + inside, view[offset : offset + length])
        except SourceError:
            if _alive(self.pid):
                raise
            if self._on_quit is not None:
                self._on_quit()
            raise SourceError(f"{self.description}: QEMU (process {self.pid}) quit while its RAM "
                              f"was being read") from None

    def close(self) -> None:
        self.process.close()


def host_addresses(regions: Sequence[RamRegion], monitor: Callable[[str], str]) -> list[int]:
    """Where QEMU keeps each region, from HMP ``gpa2hva`` run through ``monitor``."""
    addresses = []
    for region in regions:
        address = parse_host_address(monitor(f"gpa2hva {region.start:#x}"))
        if address is None:
            raise PathUnavailable(f"gpa2hva gives no host address for {region.block} at {region.start:#x}")
        addresses.append(address)
    return addresses


def open_process_ram(pid: int, regions: Sequence[RamRegion], monitor: Callable[[str], str], *, description: str,
                     on_quit: Callable[[], None] | None = None) -> ProcessRam:
    """A reader of ``regions`` from process ``pid``'s memory, not yet checked (see :func:`same_host_ram`)."""
    hosts = host_addresses(regions, monitor)
    try:
        process = ProcessMemory(pid)
    except SourceError as error:
        raise PathUnavailable(str(error)) from None
    return ProcessRam(process, regions, hosts, description=description, on_quit=on_quit)


def check_first_page(reader: RamReader, trusted: Callable[[int, int], bytes], whose: str) -> None:
    """Raise PathUnavailable unless ``reader`` gives the first page of its RAM as ``trusted`` does.

    The trusted read goes through QEMU itself (the stub's ``m``, a ``dump-guest-memory`` ELF), so
    a wrong process, a wrong mapping or a misread ``gpa2hva`` shows up before any dump is written.
    """
    start, end = (int(bound) for bound in reader.ram[0])
    length = min(PAGE_SIZE, end - start)
    page = bytearray(length)
    try:
        reader.readinto(start, memoryview(page))
    except SourceError as error:
        raise PathUnavailable(str(error)) from None
    if page != trusted(start, length):
        raise PathUnavailable(f"the first page at {start:#x} differs from {whose}")


def same_host_ram(pid: int, regions: Sequence[RamRegion], monitor: Callable[[str], str], *,
                  trusted: Callable[[int, int], bytes], whose: str, description: str,
                  on_quit: Callable[[], None] | None = None) -> ProcessRam:
    """The same-host fast path: ``regions`` from QEMU process ``pid``, checked against ``trusted``
    (``whose`` read it names in the reason the path is passed over)."""
    ram = open_process_ram(pid, regions, monitor, description=description, on_quit=on_quit)
    try:
        check_first_page(ram, trusted, whose)
    except BaseException:
        ram.close()
        raise
    return ram


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still has its memory (it exists and is no zombie awaiting its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as status:
            return status.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
