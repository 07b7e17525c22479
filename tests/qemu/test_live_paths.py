"""Every way windump reads a QEMU guest gives QEMU's own ``dump-guest-memory -w`` of the same stopped
state outside the difference table, and the readers see the guest in it: QEMU's ELF, ``windump save
gdb://`` (QEMU's process memory, and packets), ``windump-save`` in gdb (the same two), and ``qmp:``
through each memory path (shm, procmem, stream); on pc and q35, at 256 MiB and at 4 GiB (RAM above
4 GiB), and with the KDBG on two physically contiguous pages.

One booted guest per machine and size serves every path compared against it, and QEMU's reference
dump is taken once per booted guest. Guest RAM, hashed through QEMU's own ``pmemsave``, must be the
same after all the paths as before them. Packets (about 160 MiB/s) are compared at 256 MiB only.
Each dump is deleted as soon as it is compared: a 4 GiB guest's dumps are 4 GiB each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qemu_guest import (
    DIGEST_PIECE,
    FORWARD_VARIANT,
    LARGE_VARIANTS,
    VARIANTS,
    elf_notes,
    read_dump_physical,
)
from readers import PAGE_MASK, PAGE_SIZE, judges
from test_gdb_command import AFTERWARDS, check_left_clean, gdb
from test_qmp_source import qmp_released
from test_testbed import check_header

from windump_plugins.formats.kdbg import KDDEBUGGER_DATA64
from windump_plugins.guest.boot import GUEST_RESERVED_END, IMAGE_BASE, STAMP_MAGIC
from windump_plugins.guest.ram import pc_ram
from windump_plugins.save import save
from windump_plugins.sources.qmp import QmpSource

pytestmark = pytest.mark.qemu

VARIANT = {variant.name: variant for variant in VARIANTS}
#: The 256 MiB guests, kept booted for the session (other modules use the first two too).
SMALL = [VARIANT["pc-256M-1cpu"], VARIANT["q35-256M-4cpu"], FORWARD_VARIANT]
COMPARED = {variant.name: variant for variant in [*SMALL, *LARGE_VARIANTS]}

FOUR_GIB = 1 << 32
#: The legacy VGA and BIOS area at 0xA0000-0x100000, which is not RAM on either machine.
LEGACY_HOLE = 0x100000 - 0xA0000
#: A MiB of stamped RAM past the model's image, where SeaBIOS leaves nothing (it keeps its tables
#: at the top of low RAM).
UNTOUCHED_MIB = 0x700000


def on(*variants) -> pytest.MarkDecorator:
    """Run a test on these guests; tests of one guest run together, and it is booted once for them."""
    return pytest.mark.parametrize("compared", [variant.name for variant in variants], indirect=True)


@dataclass
class Compared:
    """A booted guest, QEMU's win-dmp of it and its RAM's digests before any path read it."""

    booted: Any  # conftest.BootedGuest (conftest is no module to import from)
    win_dmp: Path
    ram_before: dict[int, str]


@pytest.fixture(scope="module")
def compared(request, booted_once, boot_guest):
    """The guest named by the parameter, with its reference dump; a 4 GiB guest is booted for this
    module alone and killed, its files deleted, after its last test."""
    variant = COMPARED[request.param]
    large = variant in LARGE_VARIANTS
    booted = boot_guest(variant) if large else booted_once(variant)
    try:
        win_dmp, _ = booted.win_dmp()
        yield Compared(booted, win_dmp, booted.qemu.ram_digests(booted.model.ram))
    finally:
        if large:
            booted.close()


# -- the paths -------------------------------------------------------------------------------------

#: Writes the dump of ``Compared``'s guest to the output path, one way; ``run_windump`` runs the CLI.
PathRunner = Callable[[Compared, Path, Callable], None]


def through_elf(compared: Compared, output: Path, run_windump) -> None:
    """``windump save`` of QEMU's ELF of the stopped guest (the ELF deleted once converted)."""
    elf = compared.booted.qemu.dump(output.with_suffix(".elf"), "elf")
    try:
        result = run_windump("save", "--quiet", str(elf), str(output), timeout=600)
    finally:
        elf.unlink()
    assert result.returncode == 0, result.stderr


def through_gdb_url(options: str) -> PathRunner:
    def run(compared: Compared, output: Path, run_windump) -> None:
        """``windump save gdb://HOST:PORT``: leaves the paused VM it found paused."""
        qemu = compared.booted.qemu
        result = run_windump("save", "--quiet", f"gdb://127.0.0.1:{qemu.gdb_port}{options}", str(output), timeout=600)
        assert result.returncode == 0, result.stderr
        assert qemu.execute("query-status")["status"] == "paused"

    return run


def through_windump_save(options: str, memory: str) -> PathRunner:
    def run(compared: Compared, output: Path, run_windump) -> None:
        """``windump-save`` in gdb: says where it read RAM from, restores PhyMemMode, and leaves
        gdb's connection in step."""
        qemu = compared.booted.qemu
        try:
            result = gdb(qemu.gdb_port, f"windump-save {options} {output}", *AFTERWARDS)
        finally:
            qemu.execute("stop")  # gdb -batch detaches at exit, resuming the guest
        assert result.returncode == 0 and output.exists(), result.stdout + result.stderr
        assert f"from {memory}" in result.stdout, result.stdout
        check_left_clean(result)

    return run


def through_qmp(memory: str) -> PathRunner:
    def run(compared: Compared, output: Path, run_windump) -> None:
        """``qmp:SOCKET?memory=PATH``: the VM stays paused, and QEMU's progress is reported exactly
        when its dump streamed the RAM."""
        qemu, ram = compared.booted.qemu, compared.booted.model.ram
        reported: list[tuple[int, int]] = []
        with qmp_released(qemu) as socket_path:
            with QmpSource(socket_path, memory=memory, progress=lambda done, total: reported.append((done, total))) \
                    as source:
                report = save(source, output)
        assert report.access is not None and report.access.path == memory, report.access
        assert qemu.execute("query-status")["running"] is False
        if memory == "stream":
            assert reported, "QEMU's dump streamed the RAM but its progress was never reported"
            done = [d for d, _ in reported]
            assert done == sorted(done) and all(0 <= d <= t for d, t in reported), reported
            assert min(t for _, t in reported) >= int((ram[:, 1] - ram[:, 0]).sum()), reported
            assert qemu.execute("query-dump")["status"] == "completed"
        else:
            assert reported == [], f"{memory} reported QEMU dump progress {reported}"

    return run


PATHS: dict[str, PathRunner] = {
    "elf": through_elf,
    "gdb-url": through_gdb_url(""),
    "windump-save": through_windump_save("", "procmem"),
    "qmp-shm": through_qmp("shm"),
    "qmp-procmem": through_qmp("procmem"),
    "qmp-stream": through_qmp("stream"),
}
PACKET_PATHS: dict[str, PathRunner] = {
    "gdb-url-packets": through_gdb_url("?packets"),
    "windump-save-packets": through_windump_save("--packets", "packets"),
}


# -- judging a dump --------------------------------------------------------------------------------

def check_readers(dump: Path, model) -> None:
    """Every judge of the dump (kdmp-parser, volatility3, memprocfs) parses it, sees the model's bytes at the first image pages
    and at the top of every RAM range the guest stamps (not SeaBIOS's below 1 MiB), and translate
    both ends of the KDBG where the model put it."""
    tops = [int(end) - PAGE_SIZE for end in model.ram[:, 1] if end > GUEST_RESERVED_END]
    pages = [IMAGE_BASE, IMAGE_BASE + PAGE_SIZE, *tops]
    kdbg = model.decoded_kdbg_address
    addresses = [kdbg, kdbg + KDDEBUGGER_DATA64.itemsize - 1]
    for result in (read(dump, pages, addresses) for read in judges(dump).values()):
        assert result.parsed, f"{result.reader}: {result.reason}"
        for page in pages:
            assert result.physical[page] == model.read(page, PAGE_SIZE), f"{result.reader}: page {page:#x}"
        for va in addresses:
            physical = model.virtual_to_physical(va)
            assert result.translations[va] == physical, f"{result.reader}: {va:#x} {result.errors.get(va)}"
            assert result.virtual[va] == model.read(physical & PAGE_MASK, PAGE_SIZE), f"{result.reader}: {va:#x}"


def check_path(compared: Compared, run: PathRunner, output: Path, run_windump) -> None:
    from difftable import assert_same_outside_differences

    run(compared, output, run_windump)
    assert_same_outside_differences(output, compared.win_dmp)
    check_readers(output, compared.booted.model)
    output.unlink()


@on(*COMPARED.values())
@pytest.mark.parametrize("path", PATHS)
def test_path_equals_win_dmp(compared, path, run_windump, tmp_path):
    check_path(compared, PATHS[path], tmp_path / f"{path}.dmp", run_windump)


@on(*SMALL)
@pytest.mark.parametrize("path", PACKET_PATHS)
def test_packets_equal_win_dmp(compared, path, run_windump, tmp_path):
    check_path(compared, PACKET_PATHS[path], tmp_path / f"{path}.dmp", run_windump)


@on(*LARGE_VARIANTS)
def test_large_guest_is_stamped_above_4_gib(compared, tmp_path):
    """The guest stamps RAM above 4 GiB, publishes its note, and QEMU's win-dmp covers it all."""
    model, qemu, machine = compared.booted.model, compared.booted.qemu, compared.booted.variant.machine
    if machine.machine == "pc":
        assert np.array_equal(model.ram, np.array(pc_ram(machine.size), dtype=np.uint64))
    assert int(model.ram[-1, 0]) == FOUR_GIB
    assert int((model.ram[:, 1] - model.ram[:, 0]).sum()) == machine.size - LEGACY_HOLE
    elf = qemu.dump(tmp_path / "note.elf", "elf", begin=IMAGE_BASE, length=PAGE_SIZE)
    assert [desc for name, _, desc in elf_notes(elf) if name == "VMCOREINFO"] == [model.note[24:]]
    check_header(compared.win_dmp, model)
    for address in (FOUR_GIB, int(model.ram[-1, 1]) - PAGE_SIZE, int(model.ram[-2, 1]) - PAGE_SIZE):
        assert read_dump_physical(compared.win_dmp, address, 16) == model.read(address, 16)
        assert np.frombuffer(model.read(address, 16), dtype="<u8").tolist() == [address >> 12, STAMP_MAGIC]


@on(*COMPARED.values())
def test_guest_ram_is_unchanged_by_every_path(compared):
    """Last for each guest: QEMU's pmemsave of its RAM hashes as before the first path read it
    (and stamped RAM that SeaBIOS never touched, past the image and above 4 GiB, as the model's
    bytes do)."""
    model = compared.booted.model
    after = compared.booted.qemu.ram_digests(model.ram)
    assert after.keys() == compared.ram_before.keys()
    untouched = [UNTOUCHED_MIB, *(end - DIGEST_PIECE for start, end in model.ram.tolist() if start >= FOUR_GIB)]
    for piece in untouched:
        assert after[piece] == hashlib.sha256(model.read(piece, DIGEST_PIECE)).hexdigest(), f"{piece:#x}"
    changed = [f"{address:#x}" for address, digest in compared.ram_before.items() if after[address] != digest]
    assert not changed, f"guest RAM changed in the MiB at {', '.join(changed)}"
