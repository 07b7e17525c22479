"""Address translation: hand-built x86-64 page tables in a small in-memory source."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from windump_plugins.errors import SourceError, TranslationError
from windump_plugins.paging import X86, X86_64, X86_64_LA57, AddressSpace
from windump_plugins.source import MemorySource

PRESENT, WRITABLE, LARGE = 1, 2, 0x80
NX = 1 << 63
GIB, MIB2, KIB4 = 1 << 30, 1 << 21, 1 << 12


class FakeMemory(MemorySource):
    """Guest RAM [0, size) in a bytearray, counting reads per page."""

    description = "fake"

    def __init__(self, size: int):
        self.memory = bytearray(size)
        self.reads: list[int] = []

    @property
    def ram(self) -> np.ndarray:
        return np.array([[0, len(self.memory)]], dtype=np.uint64)

    def readinto(self, address: int, buffer: memoryview) -> None:
        self.check_range(address, len(buffer))
        self.reads.append(address)
        buffer[:] = self.memory[address:address + len(buffer)]


class PageTables:
    """Builds 4-level tables in FakeMemory, allocating table pages from ``next_table`` upward."""

    def __init__(self, memory: FakeMemory, first_table: int = 0x10000):
        self.memory = memory
        self.next_table = first_table
        self.pml4 = self.allocate()

    def allocate(self) -> int:
        page = self.next_table
        self.next_table += KIB4
        return page

    def entry(self, table: int, index: int, value: int | None = None) -> int:
        at = table + 8 * index
        if value is not None:
            self.memory.memory[at:at + 8] = value.to_bytes(8, "little")
        return int.from_bytes(self.memory.memory[at:at + 8], "little")

    def map(self, va: int, pa: int, size: int = KIB4, flags: int = PRESENT | WRITABLE) -> None:
        table = self.pml4
        for shift in (39, 30, 21, 12):
            index = (va >> shift) & 0x1FF
            if (1 << shift) == size:
                self.entry(table, index, pa | flags | (LARGE if size > KIB4 else 0))
                return
            existing = self.entry(table, index)
            if not existing & PRESENT:
                existing = self.allocate() | PRESENT | WRITABLE
                self.entry(table, index, existing)
            table = existing & 0x000F_FFFF_FFFF_F000


def reference_walk(memory: FakeMemory, cr3: int, va: int) -> int | None:
    """The textbook scalar walk: the physical address of ``va`` or None."""
    top = va >> 47
    if top not in (0, 0x1FFFF):
        return None
    table = cr3 & 0x000F_FFFF_FFFF_F000
    for shift in (39, 30, 21, 12):
        at = table + 8 * ((va >> shift) & 0x1FF)
        entry = int.from_bytes(memory.memory[at:at + 8], "little")
        if not entry & 1:
            return None
        base = entry & 0x000F_FFFF_FFFF_F000
        if shift == 12 or (shift in (30, 21) and entry & LARGE):
            return (base & ~((1 << shift) - 1)) | (va & ((1 << shift) - 1))
        table = base


KERNEL = 0xFFFFF80000000000


@pytest.fixture
def guest():
    memory = FakeMemory(0x400000)
    tables = PageTables(memory)
    tables.map(KERNEL, 0x200000, MIB2)
    tables.map(KERNEL + MIB2, 0x123000)
    tables.map(KERNEL + MIB2 + KIB4, 0x5000)
    tables.map(0x40000000, 0x40000000, GIB)  # beyond the fake RAM: translation does not touch it
    tables.map(0x1000, 0x3000, flags=PRESENT | NX)
    return memory, tables


def test_translates_4k_2m_and_1g_pages(guest):
    memory, tables = guest
    space = AddressSpace(memory, tables.pml4)
    assert int(space.translate(KERNEL + 0x12345)) == 0x212345
    assert int(space.translate(KERNEL + MIB2 + 0x10)) == 0x123010
    assert int(space.translate(KERNEL + MIB2 + KIB4 + 0xFFF)) == 0x5FFF
    assert int(space.translate(0x40000000 + 0x3456789)) == 0x43456789
    assert int(space.translate(0x1234)) == 0x3234  # NX is not part of the address


def test_translate_keeps_the_input_shape(guest):
    memory, tables = guest
    space = AddressSpace(memory, tables.pml4)
    assert space.translate(KERNEL).shape == ()
    batch = np.array([[KERNEL, 0x1000], [KERNEL + MIB2, 0x40000000]], dtype=np.uint64)
    assert space.translate(batch).tolist() == [[0x200000, 0x3000], [0x123000, 0x40000000]]


def test_large_page_frames_ignore_the_pat_bit(guest):
    memory, tables = guest
    # Bit 12 of a 2 MiB or 1 GiB entry is PAT, not an address bit.
    tables.map(KERNEL + GIB, 0x600000 | 0x1000, MIB2)
    tables.map(0x80000000, 0x80000000 | 0x1000, GIB)
    space = AddressSpace(memory, tables.pml4)
    assert int(space.translate(KERNEL + GIB + 5)) == 0x600005
    assert int(space.translate(0x80000000 + 7)) == 0x80000007


def test_strips_pcid_and_bit_63_from_the_directory_table_base(guest):
    memory, tables = guest
    space = AddressSpace(memory, tables.pml4 | (1 << 63) | 0x5A5)
    assert space.directory_table_base == tables.pml4
    assert int(space.translate(KERNEL + 1)) == 0x200001


@pytest.mark.parametrize(("va", "level"), [
    (0xFFFF_F900_0000_0000, "PML4"),
    (KERNEL + 2 * GIB, "PDPT"),
    (KERNEL + 4 * MIB2, "PD"),
    (KERNEL + MIB2 + 2 * KIB4, "PT"),
])
def test_names_the_level_where_a_walk_fails(guest, va, level):
    memory, tables = guest
    space = AddressSpace(memory, tables.pml4)
    # Where the failing entry lies, by the same walk done by hand.
    table = tables.pml4
    for shift, name in zip((39, 30, 21, 12), ("PML4", "PDPT", "PD", "PT")):
        at = table + 8 * ((va >> shift) & 0x1FF)
        if name == level:
            break
        table = tables.entry(table, (va >> shift) & 0x1FF) & 0x000F_FFFF_FFFF_F000
    with pytest.raises(TranslationError) as error:
        space.translate(va)
    assert str(error.value) == (
        f"virtual address {va:#x} does not translate: its {level} entry 0x0 at physical {at:#x} is not present"
    )


def test_reports_the_entry_value_of_a_non_present_entry(guest):
    memory, tables = guest
    tables.map(KERNEL + MIB2 + 3 * KIB4, 0x7000, flags=0)  # a paged-out PTE keeps other bits
    space = AddressSpace(memory, tables.pml4)
    with pytest.raises(TranslationError, match=r"its PT entry 0x7000 at physical 0x[0-9a-f]+ is not present$"):
        space.translate(KERNEL + MIB2 + 3 * KIB4)


@pytest.mark.parametrize("va", [0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF, 0x0001_0000_0000_0000])
def test_rejects_non_canonical_addresses(guest, va):
    memory, tables = guest
    with pytest.raises(TranslationError) as error:
        AddressSpace(memory, tables.pml4).translate(va)
    assert str(error.value) == (
        f"virtual address {va:#x} does not translate: it is not canonical for x86-64 paging (48-bit)"
    )


def test_names_the_first_failing_address_in_input_order(guest):
    memory, tables = guest
    space = AddressSpace(memory, tables.pml4)
    # The first failure (index 1) stops at the PT; a later one fails earlier, at the PML4.
    batch = [KERNEL, KERNEL + MIB2 + 2 * KIB4, 0xFFFF_F900_0000_0000, 0x8000_0000_0000_0000]
    with pytest.raises(TranslationError, match=rf"^virtual address {KERNEL + MIB2 + 2 * KIB4:#x} .* its PT entry"):
        space.translate(np.array(batch, dtype=np.uint64))


def test_an_entry_pointing_outside_ram_raises_the_source_error(guest):
    memory, tables = guest
    tables.entry(tables.pml4, 0x1F0, 0x7_0000_0000 | PRESENT)  # PDPT far beyond the 4 MiB of RAM
    with pytest.raises(SourceError, match="physical range 0x700000000-0x700001000 is not in guest RAM"):
        AddressSpace(memory, tables.pml4).translate(0xFFFF_F800_0000_0000)


def test_reads_each_table_page_once_per_batch(guest):
    memory, tables = guest
    space = AddressSpace(memory, tables.pml4)
    pages = KERNEL + MIB2 + np.arange(2, dtype=np.uint64) * np.uint64(KIB4)
    addresses = np.repeat(pages, 500) + np.tile(np.arange(500, dtype=np.uint64), 2)
    memory.reads.clear()
    space.translate(addresses)
    assert len(memory.reads) == 4  # PML4, PDPT, PD, PT: one page each
    assert len(set(memory.reads)) == 4


def test_read_crosses_page_boundaries(guest):
    memory, tables = guest
    memory.memory[0x123FF0:0x124000] = bytes(range(16))
    memory.memory[0x5000:0x5010] = bytes(range(16, 32))
    space = AddressSpace(memory, tables.pml4)
    assert space.read(KERNEL + MIB2 + 0xFF0, 0x20) == bytes(range(32))
    assert space.read(KERNEL + MIB2 + 0xFF8, 0) == b""
    assert space.read_u64(KERNEL + MIB2 + 0xFFC) == int.from_bytes(bytes([12, 13, 14, 15, 16, 17, 18, 19]), "little")
    assert space.read_u32(KERNEL + MIB2 + 0xFFE) == int.from_bytes(bytes([14, 15, 16, 17]), "little")
    assert space.read_u16(KERNEL + MIB2 + 0xFFF) == 15 | 16 << 8


def test_read_merges_physically_contiguous_pages(guest):
    memory, tables = guest
    memory.memory[0x200000:0x400000] = np.arange(0x200000 // 8, dtype="<u8").tobytes()
    space = AddressSpace(memory, tables.pml4)
    memory.reads.clear()
    data = space.read(KERNEL + 0x10, 0x10000)
    assert data == bytes(memory.memory[0x200010:0x210010])
    assert len(memory.reads) == 3 + 1  # PML4, PDPT and PD (a 2 MiB page), then one read for 17 pages


def test_read_fails_when_any_page_of_the_range_does_not_translate(guest):
    memory, tables = guest
    space = AddressSpace(memory, tables.pml4)
    with pytest.raises(TranslationError, match=rf"^virtual address {KERNEL + MIB2 + 2 * KIB4:#x} does not translate"):
        space.read(KERNEL + MIB2 + KIB4 + 0xFFF, 2)


def test_read_struct_returns_a_writable_record(guest):
    memory, tables = guest
    memory.memory[0x123008:0x123010] = (0xDEADBEEF).to_bytes(8, "little")
    dtype = np.dtype({"names": ["Tag", "Value"], "formats": ["S4", "<u8"], "offsets": [0, 8], "itemsize": 16})
    memory.memory[0x123004:0x123008] = b"gap!"
    record = AddressSpace(memory, tables.pml4).read_struct(KERNEL + MIB2, dtype)
    assert record.shape == () and int(record["Value"]) == 0xDEADBEEF
    assert record.tobytes()[4:8] == b"gap!"  # bytes no field names survive
    record["Value"] = 1  # a copy, not a view of the source
    assert memory.memory[0x123008:0x123010] == (0xDEADBEEF).to_bytes(8, "little")


def test_modes_are_data():
    assert [(level.name, level.bits, level.large_page) for level in X86_64.levels] == [
        ("PML4", 9, False), ("PDPT", 9, True), ("PD", 9, True), ("PT", 9, False)]
    assert (X86_64.virtual_bits, X86_64_LA57.virtual_bits, X86.virtual_bits) == (48, 57, 32)
    probes = np.array([0x00FF_FFFF_FFFF_FFFF, 0xFF00_0000_0000_0000, 0x0100_0000_0000_0000], dtype=np.uint64)
    assert X86_64_LA57.is_canonical(probes).tolist() == [True, True, False]


def test_the_same_walk_serves_32_bit_paging():
    """32-bit paging is one more table of data; no real 32-bit guest checks it yet."""
    memory = FakeMemory(0x100000)
    directory, table = 0x1000, 0x2000
    memory.memory[directory + 4 * 0x3FF:directory + 4 * 0x400] = (0x00400000 | LARGE | PRESENT).to_bytes(4, "little")
    memory.memory[directory + 4 * 1:directory + 4 * 2] = (table | PRESENT).to_bytes(4, "little")
    memory.memory[table + 4 * 5:table + 4 * 6] = (0x9000 | PRESENT).to_bytes(4, "little")
    space = AddressSpace(memory, directory | 0x18, X86)
    assert space.translate(np.array([0xFFC12345, 0x00405ABC], dtype=np.uint64)).tolist() == [0x00412345, 0x9ABC]
    with pytest.raises(TranslationError) as error:
        space.translate(0x1_0000_0000)
    assert str(error.value) == (
        "virtual address 0x100000000 does not translate: it is not canonical for x86 paging (32-bit)"
    )


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_vectorised_batches_equal_the_scalar_reference_walk(data):
    memory = FakeMemory(0x800000)
    tables = PageTables(memory, first_table=0x100000)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    # A random mix of mappings in a few kernel and user regions.
    for _ in range(data.draw(st.integers(1, 40))):
        size = int(rng.choice([KIB4, MIB2, GIB], p=[0.8, 0.15, 0.05]))
        region = int(rng.choice([0, KERNEL, 0xFFFF_8000_0000_0000, 0x7FF0_0000_0000]))
        va = region + int(rng.integers(0, 8)) * GIB + int(rng.integers(0, 1 << 30)) // size * size
        if reference_walk(memory, tables.pml4, va) is not None:
            continue  # already mapped (possibly by a larger page): leave it
        tables.map(va, int(rng.integers(0, 1 << 40)) // size * size, size)
    mapped = _walk_all(memory, tables.pml4)
    probes = np.concatenate([np.array(mapped, dtype=np.uint64), rng.integers(0, 2**64, 50, dtype=np.uint64)])
    probes += rng.integers(0, KIB4, probes.size, dtype=np.uint64)  # stays inside each mapped page
    expected = [reference_walk(memory, tables.pml4, int(va)) for va in probes]
    good = np.array([e is not None for e in expected])
    space = AddressSpace(memory, tables.pml4)
    assert space.translate(probes[good]).tolist() == [e for e in expected if e is not None]
    for va in probes[~good][:5]:
        with pytest.raises(TranslationError, match=f"^virtual address {int(va):#x} "):
            space.translate(np.array([*probes[good][:3], va], dtype=np.uint64))


def _walk_all(memory: FakeMemory, cr3: int) -> list[int]:
    """The base of every mapped page (canonical form), by scanning the tables."""
    found = []

    def scan(table, shift, prefix):
        entries = np.frombuffer(memory.memory, dtype="<u8", count=512, offset=table)
        for index in np.flatnonzero(entries & np.uint64(PRESENT)).tolist():
            entry = int(entries[index])
            va = prefix | (index << shift)
            if shift == 12 or (shift in (30, 21) and entry & LARGE):
                found.append(va | (0xFFFF_0000_0000_0000 if va >> 47 else 0))
            else:
                scan(entry & 0x000F_FFFF_FFFF_F000, shift - 9, va)

    scan(cr3, 39, 0)
    return found
