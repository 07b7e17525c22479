"""The QEMU test bed itself: the bare-metal guest boots as the model's crashed Windows kernel, and
QEMU's own dumps of it (win-dmp, ELF, kdump) hold what the model and the vCPUs say they must."""

from __future__ import annotations

import filecmp
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from qemu_guest import (
    VARIANTS,
    Machine,
    Variant,
    dump_header,
    dump_runs,
    elf_loads,
    elf_note_bytes,
    elf_notes,
    read_dump_physical,
    read_elf_physical,
)

from windump_plugins.formats.context import CONTEXT, CONTEXT_ALL_AMD64
from windump_plugins.formats.dumpheader import (
    DUMP_HEADER64,
    LIVE_SYSTEM_DUMP,
    PAGE_SIZE,
)
from windump_plugins.guest.boot import IMAGE_BASE, KERNEL_SELECTORS, STAMP_MAGIC
from windump_plugins.guest.pagetables import PTE_ADDRESS, PTE_LARGE, PTE_PRESENT
from windump_plugins.guest.ram import pc_ram

pytestmark = pytest.mark.qemu

VARIANT = {variant.name: variant for variant in VARIANTS}

#: Header fields QEMU rewrites (dump/win_dump.c patch_header, check_kdbg); all others pass through.
PATCHED_FIELDS = ("RequiredDumpSpace", "PfnDatabase", "BugCheckCode", "BugCheckCodePad", "BugCheckParameter1",
                  "BugCheckParameter2", "BugCheckParameter3", "BugCheckParameter4", "KdDebuggerDataBlock",
                  "DumpTypePad")
#: PhysicalMemoryBlock.Unused, which QEMU zeroes.
DESCRIPTOR_UNUSED = DUMP_HEADER64.fields["PhysicalMemoryBlock"][1] + 4

#: Bits the MMU sets in paging-structure entries it walks (accessed) and writes through (dirty).
PTE_ACCESSED_DIRTY = 0x60

_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def only(*variants: Variant):
    """Run a test on these variants only, sharing their booted guest with the other tests."""
    return pytest.mark.parametrize("booted", variants, indirect=True, ids=lambda v: v.name)


@pytest.fixture
def win_dmp(booted):
    """QEMU's win-dmp of the stopped guest and every vCPU's registers at that moment (once per guest)."""
    return booted.win_dmp()


def expected_bugcheck(model) -> tuple[int, ...]:
    """KiBugcheckData as QEMU reads it, with its LIVE_SYSTEM_DUMP substitute for code 0."""
    code, *parameters = struct.unpack("<5Q", model.read(model.virtual_to_physical(model.ki_bugcheck_data), 40))
    return (code or LIVE_SYSTEM_DUMP, *parameters)


def check_header(path: Path, model) -> None:
    """QEMU's header equals the model's published one outside the fields QEMU patches, and those
    hold what QEMU derives from the guest's memory."""
    ours, published = dump_header(path), model.header
    patched = np.zeros(DUMP_HEADER64.itemsize, dtype=bool)
    for name in PATCHED_FIELDS:
        dtype, offset = DUMP_HEADER64.fields[name][:2]
        patched[offset:offset + dtype.itemsize] = True
    patched[DESCRIPTOR_UNUSED:DESCRIPTOR_UNUSED + 4] = True
    ours_bytes = np.frombuffer(ours.tobytes(), dtype=np.uint8)
    differing = np.flatnonzero((ours_bytes != np.frombuffer(published.tobytes(), dtype=np.uint8)) & ~patched)
    assert not len(differing), f"QEMU changed header bytes it should pass through: {differing[:16]}"

    pages = int(ours["PhysicalMemoryBlock"]["NumberOfPages"])
    assert int(ours["RequiredDumpSpace"]) == DUMP_HEADER64.itemsize + pages * PAGE_SIZE == path.stat().st_size
    assert int(ours["PfnDatabase"]) == model.mm_pfn_database
    assert int(ours["KdDebuggerDataBlock"]) == model.decoded_kdbg_address
    assert tuple(int(ours[f]) for f in ("BugCheckCode", "BugCheckParameter1", "BugCheckParameter2",
                                       "BugCheckParameter3", "BugCheckParameter4")) == expected_bugcheck(model)
    assert int(ours["BugCheckCodePad"]) == int(ours["DumpTypePad"]) == 0
    assert ours_bytes[DESCRIPTOR_UNUSED:DESCRIPTOR_UNUSED + 4].tolist() == [0] * 4


def context_physical(model, vcpu: int) -> int:
    return model.virtual_to_physical(model.context_addresses[vcpu])


def test_guest_publishes_the_model_note(booted, tmp_path):
    """The guest's fw_cfg write makes QEMU carry CrashedGuest.note verbatim, with one CORE and one
    QEMU note per vCPU, and the boot parameters are still intact in guest RAM."""
    elf = booted.qemu.dump(tmp_path / "boot.elf", "elf", begin=IMAGE_BASE, length=PAGE_SIZE)
    notes = elf_notes(elf)
    assert [desc for name, _, desc in notes if name == "VMCOREINFO"] == [booted.model.note[24:]]
    assert booted.model.note in elf_note_bytes(elf)
    assert [name for name, _, _ in notes].count("CORE") == booted.variant.machine.cpus
    assert [name for name, _, _ in notes].count("QEMU") == booted.variant.machine.cpus
    assert read_elf_physical(elf, IMAGE_BASE, PAGE_SIZE) == booted.model.image[:PAGE_SIZE]


def test_win_dmp_header_matches_model(booted, win_dmp):
    """QEMU accepts the published header and patches exactly what dump/win_dump.c patches (the
    bug-check-zero variant comes out as LIVE_SYSTEM_DUMP 0x161)."""
    path, _ = win_dmp
    check_header(path, booted.model)
    if booted.model.bugcheck_code == 0:
        assert int(dump_header(path)["BugCheckCode"]) == LIVE_SYSTEM_DUMP


def page_table_pages(model) -> list[int]:
    """Physical addresses of the model's paging-structure pages, walked from its PML4."""
    pages, tables = [], [(model.directory_table_base, 4)]
    while tables:
        table, level = tables.pop()
        pages.append(table)
        entries = np.frombuffer(model.read(table, PAGE_SIZE), dtype="<u8")
        if level > 1:
            lower = entries[(entries & PTE_PRESENT != 0) & (entries & PTE_LARGE == 0)] & np.uint64(PTE_ADDRESS)
            tables += [(int(address), level - 1) for address in lower]
    return pages


def test_win_dmp_body_is_the_model_memory(booted, win_dmp):
    """QEMU's body holds the model's image byte for byte (except the KPRCB contexts QEMU patched and
    the accessed/dirty bits the MMU set in the page tables) and the stamp of every stamped page."""
    path, _ = win_dmp
    model = booted.model
    image = np.frombuffer(read_dump_physical(path, IMAGE_BASE, len(model.image)), dtype=np.uint8).copy()
    expected = np.frombuffer(model.image, dtype=np.uint8).copy()
    for vcpu in range(model.cpu_count):
        at = context_physical(model, vcpu) - IMAGE_BASE
        image[at:at + CONTEXT.itemsize] = expected[at:at + CONTEXT.itemsize]
    for table in page_table_pages(model):
        entries = slice(table - IMAGE_BASE, table - IMAGE_BASE + PAGE_SIZE, 8)
        image[entries] &= ~np.uint8(PTE_ACCESSED_DIRTY)
        expected[entries] &= ~np.uint8(PTE_ACCESSED_DIRTY)
    differing = np.flatnonzero(image != expected)
    assert not len(differing), f"the image differs from the model at {[hex(IMAGE_BASE + d) for d in differing[:8]]}"

    body = np.memmap(path, dtype=np.uint8, mode="r")
    for run_start, end, offset in dump_runs(dump_header(path)).tolist():
        for stamp_start, stamp_end in model.stamp_ranges.tolist():
            start, stop = max(run_start, stamp_start), min(end, stamp_end)
            if start >= stop:
                continue
            pages = body[offset + start - run_start:offset + stop - run_start].reshape(-1, PAGE_SIZE)
            stamps = np.ascontiguousarray(pages[:, :16]).view("<u8")
            pfns = np.arange(start // PAGE_SIZE, stop // PAGE_SIZE, dtype=np.uint64)
            good = (stamps[:, 0] == pfns) & (stamps[:, 1] == STAMP_MAGIC)
            if booted.variant.model.get("keep_running"):
                good |= pfns == model.busy_address // PAGE_SIZE
            assert good.all(), f"unstamped pages: {[hex(int(p) * PAGE_SIZE) for p in pfns[~good][:8]]}"


def test_kprcb_contexts_hold_each_vcpu(booted, win_dmp):
    """QEMU wrote each vCPU's registers into the CONTEXT its KPRCB points at, and they are the
    registers the guest loaded from the model (the running BSP excepted)."""
    path, registers = win_dmp
    model = booted.model
    for vcpu in range(model.cpu_count):
        qemu_cpu = model.windows_processor_numbers[vcpu]  # QEMU fills KiProcessorBlock[i] from its CPU i
        raw = read_dump_physical(path, context_physical(model, vcpu), CONTEXT.itemsize)
        context = np.frombuffer(raw, dtype=CONTEXT)[0]
        seen = registers[qemu_cpu]
        assert int(context["ContextFlags"]) == CONTEXT_ALL_AMD64
        assert {name: int(context[name.capitalize()]) for name in (*_GPRS, "rip")} == \
               {name: seen[name] for name in (*_GPRS, "rip")}
        assert int(context["EFlags"]) == seen["rflags"]
        assert {name: int(context[f"Seg{name.capitalize()}"]) for name in KERNEL_SELECTORS} == KERNEL_SELECTORS
        assert [int(context[f"Dr{i}"]) for i in (0, 1, 2, 3, 6, 7)] == [seen[f"dr{i}"] for i in (0, 1, 2, 3, 6, 7)]
        assert int(context["MxCsr"]) == int(context["FltSave"]["MxCsr"]) == seen["mxcsr"]
        if vcpu == 0 and booted.variant.model.get("keep_running"):
            continue
        wanted = model.cpu_states[vcpu].registers
        for name in (*_GPRS, "rflags", "gs_base", "fs_base", "dr0", "dr1", "dr2", "dr3", "dr7", "mxcsr",
                     *(f"xmm{i}" for i in range(16))):
            assert seen[name] == wanted[name], f"vCPU {vcpu} {name}: {seen[name]:#x} != model {wanted[name]:#x}"


def test_elf_cpu_notes_hold_kernel_gs_base(booted, tmp_path):
    """KERNEL_GS_BASE, which HMP does not print, reached QEMU's per-CPU state (QEMUCPUState+0x1B0)."""
    notes = elf_notes(booted.qemu.dump(tmp_path / "cpus.elf", "elf", begin=IMAGE_BASE, length=PAGE_SIZE))
    states = [desc for name, _, desc in notes if name == "QEMU"]
    for vcpu, state in enumerate(states):
        size, = struct.unpack_from("<I", state, 4)
        assert size >= 0x1B8
        assert struct.unpack_from("<Q", state, 0x1B0)[0] == booted.model.cpu_states[vcpu].registers["kernel_gs_base"]


def test_win_dmp_is_repeatable_and_restores_contexts(booted, win_dmp, tmp_path):
    """Dumping the same stopped state twice gives identical files, and QEMU put the guest's own
    (stale) CONTEXTs back into RAM afterwards."""
    first = booted.qemu.dump(tmp_path / "first.dmp")
    assert filecmp.cmp(first, booted.qemu.dump(tmp_path / "again.dmp"), shallow=False)
    model = booted.model
    for vcpu in range(model.cpu_count):
        address = context_physical(model, vcpu)
        elf = booted.qemu.dump(tmp_path / f"context{vcpu}.elf", "elf", begin=address & ~(PAGE_SIZE - 1),
                               length=PAGE_SIZE)
        assert read_elf_physical(elf, address, CONTEXT.itemsize) == model.read(address, CONTEXT.itemsize)


@only(VARIANT["pc-256M-1cpu"])
def test_kdump_zlib_dump(booted, tmp_path):
    """QEMU 7.2 writes kdump-zlib in makedumpfile's flattened form."""
    path = booted.qemu.dump(tmp_path / "qemu.kdump", "kdump-zlib")
    with open(path, "rb") as stream:
        assert stream.read(12) == b"makedumpfile"


#: What QEMU 7.2's ELF dumps hold besides RAM after SeaBIOS ran: the legacy BIOS area it shadowed
#: into RAM, the VGA framebuffer (vga.vram, a RAM block behind a PCI BAR) and the BIOS ROM.
ELF_EXTRA_BLOCKS = [(0xC0000, 0x100000), (0xFD000000, 0xFE000000), (0xFFFC0000, 0x100000000)]


def outside(ranges: list[list[int]], holes: list[list[int]]) -> list[tuple[int, int]]:
    """The parts of sorted [start, end) ``ranges`` that no range of ``holes`` covers."""
    pieces = []
    for start, end in ranges:
        for hole_start, hole_end in holes:
            if hole_start < end and start < hole_end:
                if start < hole_start:
                    pieces.append((start, hole_start))
                start = max(start, hole_end)
        if start < end:
            pieces.append((start, end))
    return pieces


@only(VARIANT["pc-256M-1cpu"], VARIANT["q35-256M-4cpu"])
def test_ram_map_matches_qemu(booted, tmp_path):
    """The RAM the model was built for (from the idle machine's ``info mtree -f``) is all in QEMU's
    ELF of the booted machine, which adds only known non-RAM blocks; pc's equals guest.ram.pc_ram."""
    loads = elf_loads(booted.qemu.dump(tmp_path / "full.elf", "elf")).tolist()
    ram = booted.model.ram.tolist()
    assert outside(ram, loads) == []
    assert outside(loads, ram) == ELF_EXTRA_BLOCKS
    if booted.variant.machine.machine == "pc":
        assert np.array_equal(booted.model.ram, np.array(pc_ram(booted.variant.machine.size), dtype=np.uint64))


def test_dumps_identical_across_boots(boot_guest, tmp_path):
    """-icount and a VM-clock RTC make two boots of the same model dump bit-identically."""
    variant = Variant("pc-256M-2cpu-reboot", Machine("pc", "256M", 2))
    paths = []
    for boot in range(2):
        guest = boot_guest(variant)
        try:
            paths.append((guest.qemu.dump(tmp_path / f"{boot}.dmp"), guest.qemu.dump(tmp_path / f"{boot}.elf", "elf")))
        finally:
            guest.qemu.kill()
    assert filecmp.cmp(paths[0][0], paths[1][0], shallow=False)
    assert filecmp.cmp(paths[0][1], paths[1][1], shallow=False)


@only(VARIANT["pc-256M-2cpu-keep-running"])
def test_keep_running_guest_changes_busy_page(booted, tmp_path):
    """The running variant keeps counting in the busy page while QEMU dumps it."""
    qemu, model = booted.qemu, booted.model
    qemu.execute("cont")
    counters: list[int] = []
    deadline = time.monotonic() + 30
    try:
        while len(set(counters)) < 2 and time.monotonic() < deadline:
            elf = qemu.dump(tmp_path / f"busy{len(counters)}.elf", "elf", begin=model.busy_address, length=PAGE_SIZE)
            counters.append(struct.unpack("<Q", read_elf_physical(elf, model.busy_address, 8))[0])
            time.sleep(0.05)
        assert qemu.execute("query-status")["running"]
    finally:
        qemu.execute("stop")
    assert len(set(counters)) == 2, f"the busy counter stayed at {counters[0]:#x}"


@only(VARIANT["pc-256M-2cpu-encoded-kdbg"])
def test_windump_matches_qemu(booted, win_dmp, run_windump, tmp_path):
    """With the KDBG encoded, windump's dump made from QEMU's ELF still equals QEMU's win-dmp of
    the same stopped state, outside the regions the difference table lists (test_live_paths
    compares every path on the plain KDBG)."""
    from difftable import assert_same_outside_differences

    qemu_dmp, _ = win_dmp
    elf = booted.qemu.dump(tmp_path / "guest.elf", "elf")
    ours = tmp_path / "windump.dmp"
    result = run_windump("save", str(elf), str(ours), timeout=300)
    assert result.returncode == 0 and ours.exists(), result.stderr
    assert_same_outside_differences(ours, qemu_dmp)
