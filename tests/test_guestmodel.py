"""The crashed-guest model checked from outside: page tables walked by hand, structures read back
through them, the CONTEXT layout pinned field by field, and the boot contract with
``drivers/guest.S`` read from the assembly source."""

from __future__ import annotations

import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from windump_plugins.errors import SourceError, TranslationError
from windump_plugins.formats import context as ctx
from windump_plugins.formats.dumpheader import DUMP_HEADER64, header_runs
from windump_plugins.formats.kdbg import KDDEBUGGER_DATA64, decode_kdbg
from windump_plugins.formats.kuser import KUSER_SHARED_DATA
from windump_plugins.guest import boot
from windump_plugins.guest.boot import (
    BOOT_FLAG_KEEP_RUNNING,
    BOOT_MAGIC,
    BOOT_PARAMS,
    IMAGE_BASE,
    KERNEL_SELECTORS,
    STAMP_MAGIC,
)
from windump_plugins.guest.layout import KERNEL_DATA, KERNEL_DATA_PAGES
from windump_plugins.guest.model import CrashedGuest
from windump_plugins.guest.ram import SAMPLE_RAM, pc_ram

PAGE = 0x1000
GIB = 1 << 30
GUEST_S = Path(__file__).resolve().parent.parent / "drivers" / "guest.S"


def u64(guest: CrashedGuest, physical: int) -> int:
    return struct.unpack("<Q", guest.read(physical, 8))[0]


def walk(guest: CrashedGuest, va: int) -> tuple[int, int, int]:
    """Translate by reading the tables from physical memory: (physical, page size, leaf entry)."""
    table = guest.directory_table_base
    for shift in (39, 30, 21, 12):
        entry = u64(guest, table + ((va >> shift) & 0x1FF) * 8)
        if not entry & 1:
            raise LookupError(f"{va:#x} not present at level {shift}")
        if shift == 12 or entry & 0x80:
            size = 1 << shift
            return (entry & 0x000F_FFFF_FFFF_F000 & ~(size - 1)) + (va & (size - 1)), size, entry
        table = entry & 0x000F_FFFF_FFFF_F000
    raise AssertionError("unreachable")


def read_virtual(guest: CrashedGuest, va: int, length: int) -> bytes:
    """Read through the hand walk, one page piece at a time."""
    out = b""
    while len(out) < length:
        piece = min(length - len(out), PAGE - (va + len(out)) % PAGE)
        out += guest.read(walk(guest, va + len(out))[0], piece)
    return out


def read_u64s(guest: CrashedGuest, va: int, count: int) -> tuple[int, ...]:
    return struct.unpack(f"<{count}Q", read_virtual(guest, va, 8 * count))


def reference_read(guest: CrashedGuest, address: int, length: int) -> bytes:
    """The model's memory page by page, the slow obvious way."""
    image_end = IMAGE_BASE + len(guest.image)
    out = bytearray()
    for page in range(address & ~(PAGE - 1), address + length, PAGE):
        if IMAGE_BASE <= page < image_end:
            content = guest.image[page - IMAGE_BASE:page - IMAGE_BASE + PAGE]
        elif any(start <= page < end for start, end in guest.stamp_ranges.tolist()):
            content = struct.pack("<QQ", page // PAGE, STAMP_MAGIC) + bytes(PAGE - 16)
        else:
            content = bytes(PAGE)
        out += content
    skip = address % PAGE
    return bytes(out[skip:skip + length])


@pytest.fixture(scope="module")
def guest() -> CrashedGuest:
    return CrashedGuest()


@pytest.fixture(scope="module")
def encoded() -> CrashedGuest:
    return CrashedGuest(cpus=4, encoded_kdbg=True, processor_order=[2, 0, 3, 1])


@pytest.fixture(scope="module")
def forward() -> CrashedGuest:
    return CrashedGuest(cpus=4, encoded_kdbg=True, processor_order=[2, 0, 3, 1], forward_kernel_data=True)


def kdbg_of(guest: CrashedGuest) -> np.ndarray:
    raw = read_virtual(guest, guest.kdbg_address, 0x368)
    if guest.encoded_kdbg:
        never = read_u64s(guest, guest.ki_wait_never_address, 1)[0]
        always = read_u64s(guest, guest.ki_wait_always_address, 1)[0]
        assert read_u64s(guest, guest.kdp_data_block_encoded, 1)[0] == 1
        raw = decode_kdbg(raw, never, always, guest.kdp_data_block_encoded)
    return np.frombuffer(raw[:KDDEBUGGER_DATA64.itemsize], dtype=KDDEBUGGER_DATA64)[0]


# -- CONTEXT ---------------------------------------------------------------------------------------

def test_context_layout_matches_winnt():
    offsets = {"ContextFlags": 0x30, "MxCsr": 0x34, "SegCs": 0x38, "SegDs": 0x3A, "SegEs": 0x3C,
               "SegFs": 0x3E, "SegGs": 0x40, "SegSs": 0x42, "EFlags": 0x44, "Dr0": 0x48, "Dr3": 0x60,
               "Dr6": 0x68, "Dr7": 0x70, "Rax": 0x78, "Rcx": 0x80, "Rdx": 0x88, "Rbx": 0x90, "Rsp": 0x98,
               "Rbp": 0xA0, "Rsi": 0xA8, "Rdi": 0xB0, "R8": 0xB8, "R15": 0xF0, "Rip": 0xF8,
               "FltSave": 0x100, "VectorRegister": 0x300, "VectorControl": 0x4A0, "DebugControl": 0x4A8,
               "LastBranchToRip": 0x4B0, "LastBranchFromRip": 0x4B8, "LastExceptionToRip": 0x4C0,
               "LastExceptionFromRip": 0x4C8}
    assert {name: ctx.CONTEXT.fields[name][1] for name in offsets} == offsets
    assert ctx.CONTEXT.itemsize == 0x4D0
    save = {"ControlWord": 0, "StatusWord": 2, "TagWord": 4, "MxCsr": 0x18, "MxCsr_Mask": 0x1C,
            "FloatRegisters": 0x20, "XmmRegisters": 0xA0}
    assert {name: ctx.XSAVE_FORMAT.fields[name][1] for name in save} == save
    assert ctx.XSAVE_FORMAT.itemsize == 0x200
    assert ctx.CONTEXT_ALL_AMD64 == (ctx.CONTEXT_CONTROL | ctx.CONTEXT_INTEGER | ctx.CONTEXT_SEGMENTS
                                     | ctx.CONTEXT_FLOATING_POINT | ctx.CONTEXT_DEBUG_REGISTERS) == 0x10001F


def test_context_from_registers_fills_what_it_has():
    xmm5 = 0x0102030405060708_1112131415161718
    raw = ctx.context_from_registers({"rip": 0xFFFFF80652001000, "rsp": 0x1000, "cs": 0x10, "ss": 0x18,
                                      "r15": 0x1515, "rbx": 0xBB, "mxcsr": 0x3F80, "xmm5": xmm5,
                                      "ftag": 0xFFF0, "cr3": 0x1AD000}).tobytes()
    (flags, mxcsr, cs) = struct.unpack_from("<IIH", raw, 0x30)
    assert flags == ctx.CONTEXT_AMD64 | 1 | 2 | 8  # control, integer, floating point; no segments/debug
    assert (mxcsr, cs, raw[0x42]) == (0x3F80, 0x10, 0x18)
    assert struct.unpack_from("<Q", raw, 0xF8)[0] == 0xFFFFF80652001000
    assert struct.unpack_from("<Q", raw, 0x90)[0] == 0xBB and struct.unpack_from("<Q", raw, 0xF0)[0] == 0x1515
    assert struct.unpack_from("<I", raw, 0x100 + 0x18)[0] == 0x3F80  # FltSave.MxCsr
    assert raw[0x100 + 0xA0 + 5 * 16:0x100 + 0xA0 + 6 * 16] == xmm5.to_bytes(16, "little")
    assert raw[0x104] == 0b11  # ST0, ST1 in use, the rest empty
    assert ctx.context_from_registers({})["ContextFlags"] == ctx.CONTEXT_AMD64


# -- page tables -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["encoded", "forward"])
def test_hand_walk_agrees_with_bookkeeping_for_every_page_size(model, request):
    g = request.getfixturevalue(model)
    cases = {  # va -> expected page size
        0x0: GIB, 0x12345678: GIB, IMAGE_BASE + 0x1234: GIB, 5 * GIB + 0x777: GIB,
        g.kernel_base: 2 << 20, g.ki_bugcheck_data: 2 << 20, g.ki_processor_block + 8: 2 << 20,
        g.kdbg_address: PAGE, g.kdbg_address + 0x300: PAGE, g.decoded_kdbg_address: PAGE,
        KUSER_SHARED_DATA + 0x264: PAGE,
        **{va: PAGE for va in g.context_addresses}, **{va: GIB for va in g.kprcb_addresses},
    }
    for va, size in cases.items():
        physical, page_size, entry = walk(g, va)
        assert (physical, page_size) == (g.virtual_to_physical(va), size), hex(va)
        assert entry & 0b11 == 0b11  # present, writable
        assert bool(entry >> 63) == (va >= 1 << 47 and size != 2 << 20)  # NX except identity map and nt code
    with pytest.raises(TranslationError):
        g.virtual_to_physical(0xFFFF_8000_0000_0000)
    with pytest.raises(LookupError):
        walk(g, 0xFFFF_8000_0000_0000)


def test_4k_pages_are_not_physically_contiguous(guest):
    """The KDBG straddles two 4 KiB pages that are not neighbours in physical memory."""
    first, second = walk(guest, guest.kdbg_address)[0], walk(guest, guest.kdbg_address + 0x200)[0]
    assert second - first != 0x200
    assert guest.kdbg_address % 16 == 0 and (guest.kdbg_address + 0x368) // PAGE != guest.kdbg_address // PAGE


def test_forward_kernel_data_puts_the_kdbg_on_contiguous_pages(forward):
    """Forward-mapped, the KDBG's two pages are physical neighbours: one physical read covers it."""
    g = forward
    first, last = walk(g, g.kdbg_address)[0], walk(g, g.kdbg_address + 0x368 - 1)[0]
    assert first // PAGE != last // PAGE and last - first == 0x368 - 1
    assert g.read(first, 0x368) == read_virtual(g, g.kdbg_address, 0x368)


def test_forward_and_reverse_map_the_same_kernel_data(encoded, forward):
    """Only the physical order of the KERNEL_DATA pages differs: through the page tables both
    models hold the same bytes, and each physical page sits where the other model's mirror does."""
    frames = []
    for page in range(KERNEL_DATA_PAGES):
        va = KERNEL_DATA + page * PAGE
        assert read_virtual(forward, va, PAGE) == read_virtual(encoded, va, PAGE), hex(va)
        frames.append((walk(forward, va)[0], walk(encoded, va)[0]))
    assert [f for f, _ in frames] == sorted(f for f, _ in frames)
    assert [r for _, r in frames] == sorted((r for _, r in frames), reverse=True)
    assert {f for f, _ in frames} == {r for _, r in frames}


# -- kernel structures -----------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["guest", "encoded", "forward"])
def test_kdbg_and_the_variables_it_points_at(model, request):
    g = request.getfixturevalue(model)
    kdbg = kdbg_of(g)
    assert (kdbg["OwnerTag"], int(kdbg["Size"])) == (b"KDBG", 0x368)
    assert int(kdbg["KernBase"]) == g.kernel_base
    assert kdbg["OffsetPcrContainedPrcb"] == 0x180
    for field in ("PsLoadedModuleList", "PsActiveProcessHead"):
        head = int(kdbg[field])
        assert read_u64s(g, head, 2) == (head, head)
        assert head == int(g.header[field])
    assert read_u64s(g, int(kdbg["KiBugcheckData"]), 1)[0] == 0xE2
    parameters = read_u64s(g, int(kdbg["KiBugcheckData"]) + 8, 4)
    assert all(parameters) and len(set(parameters)) == 4
    pfn_database = read_u64s(g, int(kdbg["MmPfnDatabase"]), 1)[0]
    assert pfn_database >= 1 << 47 and pfn_database != int(kdbg["MmPfnDatabase"])
    descriptor = read_u64s(g, int(kdbg["MmPhysicalMemoryBlock"]), 1)[0]
    count, pages = struct.unpack("<IxxxxQ", read_virtual(g, descriptor, 16))
    runs = np.frombuffer(read_virtual(g, descriptor + 16, 16 * count), dtype="<u8").reshape(-1, 2)
    assert np.array_equal(runs, header_runs(g.header)) and pages == runs[:, 1].sum()


def test_encoded_kdbg_hides_the_tag_and_the_header_points_at_the_copy(encoded, guest):
    assert read_virtual(encoded, encoded.kdbg_address, 0x18)[0x10:0x14] != b"KDBG"
    assert read_virtual(encoded, encoded.decoded_kdbg_address, 0x18)[0x10:0x14] == b"KDBG"
    assert int(encoded.header["KdDebuggerDataBlock"]) == encoded.kdbg_address != encoded.decoded_kdbg_address
    assert int(encoded.header["BugCheckParameter1"]) == encoded.decoded_kdbg_address
    assert read_virtual(guest, guest.kdbg_address, 0x18)[0x10:0x14] == b"KDBG"
    assert guest.kdbg_address == guest.decoded_kdbg_address == int(guest.header["KdDebuggerDataBlock"])
    assert int(guest.header["BugCheckParameter1"]) == 0
    assert read_u64s(guest, guest.kdp_data_block_encoded, 1)[0] == 0


def test_no_bugcheck_means_zero_bugcheck_data():
    g = CrashedGuest(bugcheck_code=0)
    assert read_u64s(g, int(kdbg_of(g)["KiBugcheckData"]), 5) == (0,) * 5


def test_processor_block_kprcbs_and_contexts(encoded):
    g, kdbg = encoded, kdbg_of(encoded)
    blocks = read_u64s(g, int(kdbg["KiProcessorBlock"]), g.cpu_count)
    assert list(blocks) == [g.kprcb_addresses[v] for v in g.processor_order]
    for number, kprcb in enumerate(blocks):
        vcpu = g.kprcb_addresses.index(kprcb)
        kpcr = kprcb - int(kdbg["OffsetPcrContainedPrcb"])
        assert read_u64s(g, kpcr + 0x18, 2) == (kpcr, kprcb)  # Self, CurrentPrcb
        assert g.cpu_states[vcpu].registers["gs_base"] == kpcr
        assert struct.unpack("<H", read_virtual(g, kprcb + int(kdbg["OffsetPrcbNumber"]), 2))[0] == number
        context_va = read_u64s(g, kprcb + int(kdbg["OffsetPrcbContext"]), 1)[0]
        assert context_va == g.context_addresses[vcpu] and context_va % 16 == 0
        stale = np.frombuffer(read_virtual(g, context_va, 0x4D0), dtype=ctx.CONTEXT)[0]
        assert stale["ContextFlags"] & ctx.CONTEXT_AMD64 and stale["SegCs"] == 0x10 and stale["SegSs"] == 0x18
        assert stale["MxCsr"] == stale["FltSave"]["MxCsr"] == 0x1F80
        assert int(stale["Rsp"]) != g.cpu_states[vcpu].registers["rsp"]  # stale, not what the vCPU holds
    assert len(set(blocks)) == g.cpu_count


def test_kuser_shared_data(guest):
    page = read_virtual(guest, KUSER_SHARED_DATA, PAGE)
    low, high1, high2 = struct.unpack_from("<IiI", page, 0x14)
    assert high1 == high2 and (high1 << 32 | low) == 133485408000000000  # 2024-01-01 00:00 UTC
    interrupt = struct.unpack_from("<IiI", page, 0x08)
    assert interrupt[1] == interrupt[2] and interrupt[0] | interrupt[1] << 32 > 0
    assert struct.unpack_from("<I", page, 0x264)[0] == 1
    assert struct.unpack_from("<I", page, 0x2D0)[0] != 0


# -- the published note and header -----------------------------------------------------------------

def test_note_and_published_header(guest):
    note = guest.read(guest.note_address, 24 + 0x2000)
    assert note == guest.note
    assert struct.unpack_from("<III", note) == (11, 0x2000, 0) and note[12:24] == b"VMCOREINFO\0\0"
    raw = note[24:]
    assert raw[:8] == b"PAGEDU64" and struct.unpack_from("<II", raw, 8) == (0xF, 19041)
    assert raw[0x3C:0x40] == raw[0x8C:0x90] == b"PAGE"  # pads keep Windows' filler
    assert raw[0xF00:0xF98] == bytes(0x98)
    header = np.frombuffer(raw, dtype=DUMP_HEADER64)[0]
    assert int(header["DirectoryTableBase"]) == guest.directory_table_base
    assert (header["MachineImageType"], header["NumberProcessors"], header["BugCheckCode"]) == (0x8664, 2, 0)
    assert header["DumpType"] == 1 and header["SystemTime"] < 133485408000000000
    assert np.array_equal(header_runs(header), [[1, 0x9F], [0x100, 0x1C00 - 0x100], [0x1E00, 0x600]])
    pages = int(header["PhysicalMemoryBlock"]["NumberOfPages"])
    assert int(header["RequiredDumpSpace"]) != 0x2000 + pages * PAGE  # stale on purpose
    context = np.frombuffer(raw[0x348:0x348 + 0x4D0], dtype=ctx.CONTEXT)[0]
    assert context["ContextFlags"] & ctx.CONTEXT_AMD64 and context["SegCs"] == 0x10
    assert context["MxCsr"] == context["FltSave"]["MxCsr"] == 0x1F80
    assert raw[0x348 + 0x4D0:0x348 + 0x4D4] == b"PAGE"


def test_boot_params_and_cpu_states():
    g = CrashedGuest(cpus=8, keep_running=True)
    params = np.frombuffer(g.image[:BOOT_PARAMS.itemsize], dtype=BOOT_PARAMS)[0]
    assert params.tobytes() == g.boot_params.tobytes()
    assert (params["Magic"], params["Cr3"], params["CpuCount"]) == (BOOT_MAGIC, g.directory_table_base, 8)
    assert (params["NoteSize"], params["NoteAddress"]) == (0x2018, g.note_address)
    assert params["Flags"] == BOOT_FLAG_KEEP_RUNNING
    count = int(params["StampRangeCount"])
    assert np.array_equal(params["StampRanges"][:count], g.stamp_ranges) and not params["StampRanges"][count:].any()
    busy = int(params["BusyAddress"])
    assert busy % PAGE == 0 and g.read(busy, 16) == struct.pack("<QQ", busy // PAGE, STAMP_MAGIC)
    assert CrashedGuest().boot_params["Flags"] == 0
    for v, state in enumerate(g.cpu_states):
        cpu, r = params["Cpu"][v], state.registers
        assert state.index == v
        assert list(cpu["Gpr"][[0, 1, 2, 3, 7, 15]]) == [r["rax"], r["rbx"], r["rcx"], r["rdx"], r["rsp"], r["r15"]]
        assert (cpu["Rflags"], cpu["GsBase"], cpu["KernelGsBase"]) == (r["rflags"], r["gs_base"], 0)
        assert (cpu["Dr7"], cpu["MxCsr"]) == (r["dr7"], r["mxcsr"])
        assert list(cpu["Dr"]) == [r[f"dr{i}"] for i in range(4)]
        assert bytes(cpu["Xmm"][3]) == r["xmm3"].to_bytes(16, "little")
        assert r["rflags"] & 0x202 == 0x2 and r["mxcsr"] & 0x1F80 == 0x1F80  # IF clear, exceptions masked
        assert r["dr7"] & 0xFF and {k: r[k] for k in KERNEL_SELECTORS} == KERNEL_SELECTORS
        assert r["cr3"] == g.directory_table_base and r["gs_base"] == g.kpcr_addresses[v]
    for name in ["rax", "rsp", "r15", "rflags", "gs_base", "dr0", "dr3", "dr7", "mxcsr", "xmm0", "xmm15"]:
        assert len({state.registers[name] for state in g.cpu_states}) == 8, name


# -- physical memory -------------------------------------------------------------------------------

def test_stamps_image_and_zeros(guest):
    assert guest.stamp_ranges[0, 0] == 2 << 20
    for start, end in guest.stamp_ranges.tolist():
        assert not (start < IMAGE_BASE + len(guest.image) and IMAGE_BASE < end)
        for page in (start, end - PAGE):
            assert guest.read(page, PAGE) == stamp_bytes(page)
    assert guest.read(0x1000, PAGE) == bytes(PAGE)  # below 2 MiB: not stamped
    assert guest.read(IMAGE_BASE, len(guest.image)) == guest.image
    assert len(guest.image) % PAGE == 0 and guest.image_base == IMAGE_BASE


def stamp_bytes(page: int) -> bytes:
    return struct.pack("<QQ", page // PAGE, STAMP_MAGIC) + bytes(PAGE - 16)


def test_vectorised_read_matches_page_by_page_reference(guest):
    rng = np.random.default_rng(1)
    for _ in range(200):
        start, end = guest.ram[rng.integers(len(guest.ram))].tolist()
        address = int(rng.integers(start, end))
        length = int(rng.integers(0, min(end - address, 5 * PAGE) + 1))
        assert guest.read(address, length) == reference_read(guest, address, length), (hex(address), length)
    around_image, length = IMAGE_BASE - 3 * PAGE + 5, len(guest.image) + 6 * PAGE
    assert guest.read(around_image, length) == reference_read(guest, around_image, length)


def test_readinto_fills_a_caller_buffer(guest):
    buffer = bytearray(b"\xff" * 3 * PAGE)
    guest.readinto(0x300000, memoryview(buffer)[PAGE:2 * PAGE])
    assert buffer[PAGE:2 * PAGE] == stamp_bytes(0x300000) and buffer[:PAGE] == b"\xff" * PAGE


@pytest.mark.parametrize("address, length", [
    (0x9F000, 0x2000),  # runs into the legacy hole
    (0xA0000, 0x10),  # inside it
    (0x1BFF000, 0x2000),  # across the hole at 28 MiB
    (0x2400000, 1),  # past the end of RAM
    (-0x1000, 0x2000),
])
def test_reads_outside_ram_raise(guest, address, length):
    with pytest.raises(SourceError):
        guest.read(address, length)


def test_five_gib_layout_without_allocating_it():
    tracemalloc.start()
    try:
        g = CrashedGuest(ram=pc_ram(5 << 30), cpus=3)
        top = 6 * GIB - PAGE
        assert g.read(top, PAGE) == stamp_bytes(top)
        assert g.read(4 * GIB, 32) == stamp_bytes(4 * GIB)[:32]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert g.ram.tolist() == [[0, 0xA0000], [0x100000, 0xC0000000], [4 * GIB, 6 * GIB]]
    assert header_runs(g.header)[-1].tolist() == [4 * GIB // PAGE, 2 * GIB // PAGE]
    with pytest.raises(SourceError):
        g.read(0xC0000000 - PAGE, 2 * PAGE)


@pytest.mark.parametrize("arguments", [
    {"cpus": 0}, {"cpus": 9}, {"cpus": 2, "processor_order": [0, 0]}, {"cpus": 2, "processor_order": [1, 2]},
    {"ram": [(0, 0x400000)]},  # too small for the image
    {"ram": [(0x100000, 0x2000000), (0, 0xA0000)]},  # unsorted
    {"ram": [(0, 0x2000800)]},  # not page aligned
])
def test_bad_arguments(arguments):
    with pytest.raises(ValueError):
        CrashedGuest(**arguments)


def test_deterministic_and_default_ram():
    assert CrashedGuest().image == CrashedGuest().image
    assert CrashedGuest().header.tobytes()[0x1058:] == b"PAGE" * ((0x2000 - 0x1058) // 4)
    assert CrashedGuest().ram.tolist() == [list(r) for r in SAMPLE_RAM]
    assert sum(end - start for start, end in SAMPLE_RAM) >= 32 << 20


# -- the boot contract with drivers/guest.S --------------------------------------------------------

def guest_constants() -> dict[str, int]:
    """Every ``.set NAME, VALUE`` of the test guest's assembly source."""
    sets = re.findall(r"^\s*\.set\s+(\w+),\s*(0x[0-9A-Fa-f]+|\d+)", GUEST_S.read_text(), re.MULTILINE)
    return {name: int(value, 0) for name, value in sets}


def test_guest_assembly_agrees_with_the_boot_contract():
    """drivers/guest.S repeats boot.py's numbers: each must be the same on both sides."""
    guest = guest_constants()
    fields = {name: BOOT_PARAMS.fields[name][1] for name in BOOT_PARAMS.names}
    cpu_fields = {name: boot.BOOT_CPU.fields[name][1] for name in boot.BOOT_CPU.names}
    expected = {
        "IMAGE_BASE": IMAGE_BASE, "GUEST_RESERVED_END": boot.GUEST_RESERVED_END,
        "BOOT_MAGIC_LO": BOOT_MAGIC & 0xFFFFFFFF, "BOOT_MAGIC_HI": BOOT_MAGIC >> 32,
        "BP_CR3": fields["Cr3"], "BP_CPU_COUNT": fields["CpuCount"], "BP_NOTE_SIZE": fields["NoteSize"],
        "BP_NOTE_ADDRESS": fields["NoteAddress"], "BP_STAMP_COUNT": fields["StampRangeCount"],
        "BP_FLAGS": fields["Flags"], "BP_BUSY_ADDRESS": fields["BusyAddress"],
        "BP_STAMP_RANGES": fields["StampRanges"], "BP_CPU": fields["Cpu"],
        "BOOT_CPU_SIZE": boot.BOOT_CPU.itemsize, "MAX_CPUS": boot.MAX_CPUS,
        "MAX_STAMP_RANGES": boot.MAX_STAMP_RANGES, "STAMP_MAGIC": STAMP_MAGIC,
        "BOOT_FLAG_KEEP_RUNNING": BOOT_FLAG_KEEP_RUNNING,
        "CPU_GPR": cpu_fields["Gpr"], "CPU_RFLAGS": cpu_fields["Rflags"], "CPU_GS_BASE": cpu_fields["GsBase"],
        "CPU_KERNEL_GS_BASE": cpu_fields["KernelGsBase"], "CPU_FS_BASE": cpu_fields["FsBase"],
        "CPU_DR": cpu_fields["Dr"], "CPU_DR7": cpu_fields["Dr7"], "CPU_MXCSR": cpu_fields["MxCsr"],
        "CPU_XMM": cpu_fields["Xmm"],
        "KGDT64_R0_CODE": KERNEL_SELECTORS["cs"], "KGDT64_R0_DATA": KERNEL_SELECTORS["ss"],
        "KGDT64_R3_DATA": KERNEL_SELECTORS["ds"], "KGDT64_R3_CMTEB": KERNEL_SELECTORS["fs"],
    }
    differing = {name: (value, guest.get(name)) for name, value in expected.items() if guest.get(name) != value}
    assert not differing, f"(boot.py, guest.S) disagree: {differing}"
    assert KERNEL_SELECTORS["es"] == KERNEL_SELECTORS["gs"] == KERNEL_SELECTORS["ds"]
    record_shift = re.search(r"shl \$(\d+), %r15\s*/\* \* BOOT_CPU_SIZE", GUEST_S.read_text())
    assert record_shift and 1 << int(record_shift[1]) == boot.BOOT_CPU.itemsize


def test_guest_pops_the_gprs_in_boot_gpr_order():
    """load_cpu pops BOOT_CPU.Gpr off a frame: its pops (rsp's slot skipped, loaded last) are
    BOOT_GPR_ORDER."""
    text = GUEST_S.read_text()
    body = text[text.index("\nload_cpu:"):]
    body = body[:body.index("hlt")]
    popped = re.findall(r"^\s*(pop %(\w+)|lea 8\(%rsp\), %rsp)", body, re.MULTILINE)
    order = [register or "rsp" for _, register in popped]
    assert tuple(order) == boot.BOOT_GPR_ORDER
