"""One model of a crashed Windows x64 guest: the memory the ``sample:`` source serves, the fixtures
of the unit tests, and the structures the bare-metal test guest in ``drivers/`` boots with.

:class:`CrashedGuest` places everything a dump path reads into one *image* loaded at
:data:`IMAGE_BASE`: the boot parameters, the VMCOREINFO note with the header the driver published
at boot, 4-level page tables, the KDBG (plain or encoded), the kernel variables it points at, one
KPCR/KPRCB per vCPU and their CONTEXT areas, and KUSER_SHARED_DATA. Every other page of RAM from
2 MiB up is *stamped* (its first 16 bytes are its PFN and :data:`STAMP_MAGIC`), the rest is zero.

The page tables use all three page sizes on the dump path: the kernel's variables sit in a 2 MiB
page, the KDBG, the processor CONTEXTs and the memory descriptor in 4 KiB pages (mapped in reverse
physical order, and the KDBG straddles two of them), the KPCRs in a 1 GiB page aliasing low memory.
Leaf entries outside the identity map carry NX, so the test guest must set EFER.NXE (and its CPU
must offer 1 GiB pages, e.g. ``-cpu max``) before it loads :attr:`CrashedGuest.directory_table_base`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..formats.context import CONTEXT, MXCSR_DEFAULT, context_from_registers
from ..errors import SourceError, TranslationError
from ..formats.dumpheader import (
    DUMP_HEADER64,
    DUMP_TYPE_FULL,
    EXCEPTION_RECORD64,
    IMAGE_FILE_MACHINE_AMD64,
    PAGE_SHIFT,
    PAGE_SIZE,
    SIGNATURE,
    VALID_DUMP64,
    layout,
    set_header_runs,
)
from ..formats.kuser import KUSER_SHARED_DATA
from ..formats.kdbg import KDDEBUGGER_DATA64, OWNER_TAG, encode_kdbg
from ..source import CpuState

#: Physical address where the model's image (boot parameters first) is loaded into the guest.
IMAGE_BASE = 0x400000

#: Every stamped page starts with its own page-frame number and then this magic ("WINDUMP!").
STAMP_MAGIC = 0x21504D55444E4957

BOOT_MAGIC = 0x3130544F4F424457  # "WDBOOT01"
MAX_STAMP_RANGES = 16
MAX_CPUS = 8

#: Flags in BOOT_PARAMS.Flags.
BOOT_FLAG_KEEP_RUNNING = 1  # after publishing, the BSP loops forever changing BusyAddress's page

#: What each vCPU loads before it halts (the values :attr:`CrashedGuest.cpu_states` expects).
BOOT_CPU = layout(0x200, [
    (0x000, "Gpr", ("<u8", 16)),  # rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15
    (0x080, "Rflags", "<u8"),
    (0x088, "GsBase", "<u8"),
    (0x090, "KernelGsBase", "<u8"),
    (0x098, "FsBase", "<u8"),
    (0x0A0, "Dr", ("<u8", 4)),  # dr0-dr3
    (0x0C0, "Dr7", "<u8"),
    (0x0C8, "MxCsr", "<u4"),
    (0x0D0, "Xmm", ("u1", (16, 16))),  # xmm0-xmm15, little endian
])

#: The block at IMAGE_BASE that the bare-metal guest reads at boot.
BOOT_PARAMS = layout(0x1200, [
    (0x000, "Magic", "<u8"),
    (0x008, "Cr3", "<u8"),  # the model's PML4: identity-maps low memory and maps the kernel
    (0x010, "CpuCount", "<u4"),
    (0x014, "NoteSize", "<u4"),  # 24 + 0x2000
    (0x018, "NoteAddress", "<u8"),  # physical address of the VMCOREINFO note to publish
    (0x020, "StampRangeCount", "<u4"),
    (0x024, "Flags", "<u4"),
    (0x028, "BusyAddress", "<u8"),  # physical page the running variant keeps changing
    (0x040, "StampRanges", ("<u8", (MAX_STAMP_RANGES, 2))),  # [start, end) pages to stamp
    (0x200, "Cpu", (BOOT_CPU, MAX_CPUS)),
])

#: Kernel selectors as a real Windows x64 kernel has them; the test guest's GDT matches.
KERNEL_SELECTORS = {"cs": 0x10, "ss": 0x18, "ds": 0x2B, "es": 0x2B, "fs": 0x53, "gs": 0x2B}


def stamp_page(pfn: int) -> np.ndarray:
    """The first 16 bytes of a stamped page: its page-frame number, then :data:`STAMP_MAGIC`."""
    return np.array([pfn, STAMP_MAGIC], dtype="<u8")


#: RAM of the default model: 36 MiB with the legacy hole below 1 MiB and a 2 MiB hole at 28 MiB.
SAMPLE_RAM = ((0, 0xA0000), (0x100000, 0x1C00000), (0x1E00000, 0x2400000))

# Guest virtual layout (Windows 10 x64 style addresses; the values are the model's own).
KERNEL_BASE = 0xFFFFF806_52000000  # nt, one 2 MiB page
KERNEL_DATA = KERNEL_BASE + 0x200000  # 4 KiB pages right after nt's large page
LOW_MEMORY_ALIAS = 0xFFFFD000_00000000  # a 1 GiB page over physical [0, 1 GiB): the KPCRs
PFN_DATABASE = 0xFFFFB700_00000000  # value of nt!MmPfnDatabase; the array itself is not mapped

# Processor-block geometry the KDBG advertises (model values, not those of a Windows build).
KDBG_SIZE = 0x368
OFFSET_PCR_CONTAINED_PRCB = 0x180
SIZE_PCR = 0x4000
SIZE_PRCB = SIZE_PCR - OFFSET_PCR_CONTAINED_PRCB
OFFSET_PRCB_NUMBER = 0x24
OFFSET_PRCB_CONTEXT = 0x6D8
OFFSET_PCR_SELF = 0x18
OFFSET_PCR_CURRENT_PRCB = 0x20

#: KiWaitNever / KiWaitAlways values (REFERENCE section 5's known answer).
KI_WAIT_NEVER = 0x5A3C96F01E2D4B87
KI_WAIT_ALWAYS = 0x0123456789ABCDEF

#: The crash's wall clock (KUSER SystemTime): 2024-01-01 00:00:00 UTC as a FILETIME.
SYSTEM_TIME = (1704067200 + 11644473600) * 10**7
#: Uptime at the crash (KUSER InterruptTime), and when the driver captured the header after boot.
INTERRUPT_TIME = 4980 * 10**7
HEADER_UPTIME = 15 * 10**7
NT_PRODUCT_WIN_NT = 1
SUITE_MASK = 0x110  # VER_SUITE_TERMINAL | VER_SUITE_SINGLEUSERTS, as on a client edition
BUGCHECK_PARAMETERS = (0xFFFFF806_52011111, 0x2222, 0x3333_0000_0000, 0x4444)

# Page-table entry bits.
PTE_PRESENT = 0x1
PTE_WRITABLE = 0x2
PTE_LARGE = 0x80
PTE_NX = 1 << 63
PTE_ADDRESS = 0x000F_FFFF_FFFF_F000

_KERNEL_PAGE = 1 << 21
_HUGE_PAGE = 1 << 30

# Physical layout of the image, as offsets from IMAGE_BASE.
_NOTE = 0x2000
_TABLES = 0x5000  # page-table pool, up to _KUSER
_KUSER = 0x10000
_DATA = 0x20000  # the KERNEL_DATA pages, in reverse order
_DATA_PAGES = 7
_PCRS = 0x40000
_KERNEL = 0x200000
_IMAGE_SIZE = _KERNEL + 0x2000  # nt's header page and its variables page

# Where things sit in nt's variables page (KERNEL_BASE + 0x1000) and in the KERNEL_DATA pages.
_VARIABLES = KERNEL_BASE + 0x1000
_KDBG = KERNEL_DATA + 0xE00  # crosses into the next (physically distant) page
_DECODED_KDBG = KERNEL_DATA + 0x2040
_DESCRIPTOR = KERNEL_DATA + 0x3000
_CONTEXTS = KERNEL_DATA + 0x4000  # three per page, 0x500 apart
_CONTEXT_STRIDE = 0x500

_NOTE_NAME = b"VMCOREINFO\0"


class Mapping(NamedTuple):
    """One contiguous mapping the model's page tables make: ``size`` bytes from ``virtual``."""

    virtual: int
    physical: int
    size: int
    page_size: int


def pc_ram(size: int) -> tuple[tuple[int, int], ...]:
    """The RAM ranges QEMU's ``pc`` machine gives a guest of ``size`` bytes: the legacy hole at
    0xA0000-0x100000, and above 3.5 GiB low RAM stops at 3 GiB and the rest moves above 4 GiB."""
    if size <= 0x100000:
        raise ValueError(f"{size:#x} bytes of RAM end before the legacy hole does")
    low = size if size < 0xE0000000 else 0xC0000000
    ram = ((0, 0xA0000), (0x100000, low))
    return ram + ((0x100000000, 0x100000000 + size - low),) if size > low else ram


def _ranges(ram: Sequence[Sequence[int]]) -> np.ndarray:
    """Validated, page-aligned [start, end) ranges with touching neighbours merged."""
    r = np.asarray(ram, dtype=np.uint64).reshape(-1, 2)
    if not len(r) or (r % PAGE_SIZE).any() or (r[:, 0] >= r[:, 1]).any() or (r[1:, 0] < r[:-1, 1]).any():
        raise ValueError("RAM must be sorted, non-overlapping, non-empty page-aligned [start, end) ranges")
    gap = r[1:, 0] != r[:-1, 1]
    return np.stack([r[np.r_[True, gap], 0], r[np.r_[gap, True], 1]], axis=1)


def _subtract(ranges: np.ndarray, cut_start: int, cut_end: int) -> np.ndarray:
    """Sorted [start, end) ``ranges`` minus the interval [cut_start, cut_end)."""
    left = np.stack([ranges[:, 0], np.minimum(ranges[:, 1], np.uint64(cut_start))], axis=1)
    right = np.stack([np.maximum(ranges[:, 0], np.uint64(cut_end)), ranges[:, 1]], axis=1)
    pieces = np.concatenate([left, right])
    pieces = pieces[pieces[:, 0] < pieces[:, 1]]
    return pieces[np.argsort(pieces[:, 0], kind="stable")]


def _inside(ranges: np.ndarray, addresses: np.ndarray) -> np.ndarray:
    """Which ``addresses`` fall in one of the sorted [start, end) ``ranges``."""
    i = np.searchsorted(ranges[:, 0], addresses, side="right") - 1
    return (i >= 0) & (addresses < ranges[np.maximum(i, 0), 1])


def _header_from_bytes(data: bytes) -> np.ndarray:
    """A writable 0-d header over its own copy of ``data``: ``ndarray.copy()`` of a dtype with
    gaps leaves the gap bytes (0x338-0x348, 0x1058-0x2000) uninitialised, so it is not used."""
    return np.frombuffer(bytearray(data), dtype=DUMP_HEADER64).reshape(())


def _ksystem_time(value: int) -> bytes:
    """KSYSTEM_TIME: LowPart, High1Time, High2Time (the two high halves equal when consistent)."""
    return struct.pack("<III", value & 0xFFFFFFFF, value >> 32, value >> 32)


class CrashedGuest:
    """A deterministic crashed Windows x64 guest with ``cpus`` vCPUs and the given RAM ranges.

    ``ram`` lists the machine's [start, end) RAM ranges (see :func:`pc_ram`); it may reach far above
    4 GiB, nothing is allocated per page of it. ``encoded_kdbg`` keeps the KDBG encoded as Windows 8+
    does, with a plaintext copy whose address the header's BugCheckParameter1 holds (as the fwcfg64
    driver does). ``processor_order[i]`` is the vCPU whose KPRCB is Windows processor i
    (KiProcessorBlock[i]). ``keep_running`` asks the test guest to keep scribbling on
    ``busy_address`` after publishing. Bad arguments raise ValueError.

    Physical side: ``ram`` and ``stamp_ranges`` ((N, 2) uint64 [start, end) bytes, read-only),
    ``image_base``, ``image``, ``boot_params``, ``note``, ``note_address``, ``header``,
    ``busy_address``, :meth:`readinto` / :meth:`read`, :meth:`windows_runs`.
    Virtual side (all VAs): ``directory_table_base`` (physical), ``kernel_base``, ``kdbg_address``
    (what the header's KdDebuggerDataBlock holds), ``decoded_kdbg_address`` (the plaintext KDBG;
    the same address in the plain variant), per vCPU ``kpcr_addresses``, ``kprcb_addresses``,
    ``context_addresses`` and ``windows_processor_numbers`` (its KPRCB Number), ``mappings`` (what
    the page tables map) and :meth:`virtual_to_physical`. The kernel variables, by address as the
    KDBG holds them: ``ps_loaded_module_list``, ``ps_active_process_head``, ``ki_bugcheck_data``,
    ``mm_pfn_database``, ``mm_physical_memory_block``, ``ki_processor_block``,
    ``ki_wait_never_address``, ``ki_wait_always_address`` and ``kdp_data_block_encoded`` (the
    encoding key; the variable is 1 in the encoded variant, 0 in the plain one). ``ki_wait_never``
    and ``ki_wait_always`` are the values, so ``decode_kdbg(data, g.ki_wait_never,
    g.ki_wait_always, g.kdp_data_block_encoded)`` decodes. vCPU side: ``cpu_states``, the registers
    each vCPU holds once halted (no rip: the test guest's halt loop decides it).
    """

    def __init__(self, *, ram: Sequence[Sequence[int]] = SAMPLE_RAM, cpus: int = 2, encoded_kdbg: bool = False,
                 bugcheck_code: int = 0xE2, processor_order: Sequence[int] | None = None,
                 keep_running: bool = False) -> None:
        if not 1 <= cpus <= MAX_CPUS:
            raise ValueError(f"the model has 1 to {MAX_CPUS} vCPUs, not {cpus}")
        order = tuple(range(cpus)) if processor_order is None else tuple(int(v) for v in processor_order)
        if sorted(order) != list(range(cpus)):
            raise ValueError(f"processor_order {order} is not a permutation of the {cpus} vCPUs")
        self.ram = _ranges(ram)
        self.image_base = IMAGE_BASE
        if not _inside(self.ram, np.array([IMAGE_BASE, IMAGE_BASE + _IMAGE_SIZE - 1], dtype=np.uint64)).all():
            raise ValueError(f"RAM must hold the model's image at {IMAGE_BASE:#x}-{IMAGE_BASE + _IMAGE_SIZE:#x}")
        self.cpu_count = cpus
        self.processor_order = order
        self.encoded_kdbg = encoded_kdbg
        self.bugcheck_code = bugcheck_code
        self._image = bytearray(_IMAGE_SIZE)
        self._image_words = np.frombuffer(self._image, dtype="<u8")
        self._next_table = IMAGE_BASE + _TABLES
        self.mappings: list[Mapping] = []

        self.directory_table_base = self._new_table()
        self._map_memory()
        self.stamp_ranges = _subtract(_subtract(self.ram, 0, _KERNEL_PAGE), IMAGE_BASE, IMAGE_BASE + _IMAGE_SIZE)
        if len(self.stamp_ranges) > MAX_STAMP_RANGES:
            raise ValueError(f"{len(self.stamp_ranges)} stamp ranges, the boot parameters hold {MAX_STAMP_RANGES}")
        self.busy_address = int(self.stamp_ranges[0, 0])
        self.kernel_base = KERNEL_BASE
        self._place_kernel_variables()
        self._place_processors()
        self._place_kdbg()
        self._place_kuser_shared_data()
        self._header = self._published_header()
        self._write(_DESCRIPTOR, self._memory_descriptor())
        self.note_address = IMAGE_BASE + _NOTE
        self.note = struct.pack("<III", len(_NOTE_NAME), self._header.nbytes, 0) + _NOTE_NAME.ljust(12, b"\0")
        self.note += self._header.tobytes()
        self._image[_NOTE:_NOTE + len(self.note)] = self.note
        self.cpu_states = [self._cpu_state(v) for v in range(cpus)]
        self.boot_params = self._boot_params(keep_running)
        self._image[:BOOT_PARAMS.itemsize] = self.boot_params.tobytes()
        self.image = bytes(self._image)
        self._image_bytes = np.frombuffer(self.image, dtype=np.uint8)
        for array in (self.ram, self.stamp_ranges, self.boot_params):
            array.flags.writeable = False

    # -- page tables --------------------------------------------------------------------------

    def _new_table(self) -> int:
        table, self._next_table = self._next_table, self._next_table + PAGE_SIZE
        return table

    def _map(self, virtual: int, physical: int, size: int, page_size: int, flags: int) -> None:
        """Map ``size`` bytes with pages of ``page_size`` (4 KiB, 2 MiB or 1 GiB), creating tables."""
        leaf_shift = {PAGE_SIZE: 12, _KERNEL_PAGE: 21, _HUGE_PAGE: 30}[page_size]
        for offset in range(0, size, page_size):
            table = self.directory_table_base
            for shift in range(39, leaf_shift, -9):
                slot = table + ((virtual + offset) >> shift & 0x1FF) * 8
                if not self._entry(slot):
                    self._set_entry(slot, self._new_table() | PTE_PRESENT | PTE_WRITABLE)
                table = self._entry(slot) & PTE_ADDRESS
            leaf = physical + offset | flags | PTE_PRESENT | (PTE_LARGE if page_size != PAGE_SIZE else 0)
            self._set_entry(table + ((virtual + offset) >> leaf_shift & 0x1FF) * 8, leaf)
        self.mappings.append(Mapping(virtual, physical, size, page_size))

    def _entry(self, physical: int) -> int:
        return int(self._image_words[(physical - IMAGE_BASE) // 8])

    def _set_entry(self, physical: int, value: int) -> None:
        self._image_words[(physical - IMAGE_BASE) // 8] = value

    def _map_memory(self) -> None:
        self._map(0, 0, 512 * _HUGE_PAGE, _HUGE_PAGE, PTE_WRITABLE)  # PML4 slot 0: identity
        self._map(KERNEL_BASE, IMAGE_BASE + _KERNEL, _KERNEL_PAGE, _KERNEL_PAGE, PTE_WRITABLE)
        for page in range(_DATA_PAGES):
            physical = IMAGE_BASE + _DATA + (_DATA_PAGES - 1 - page) * PAGE_SIZE
            self._map(KERNEL_DATA + page * PAGE_SIZE, physical, PAGE_SIZE, PAGE_SIZE, PTE_WRITABLE | PTE_NX)
        self._map(KUSER_SHARED_DATA, IMAGE_BASE + _KUSER, PAGE_SIZE, PAGE_SIZE, PTE_WRITABLE | PTE_NX)
        self._map(LOW_MEMORY_ALIAS, 0, _HUGE_PAGE, _HUGE_PAGE, PTE_WRITABLE | PTE_NX)

    def virtual_to_physical(self, va: int) -> int:
        """Where ``va`` lies, from the model's own bookkeeping (not a page-table walk)."""
        for m in self.mappings:
            if m.virtual <= va < m.virtual + m.size:
                return m.physical + va - m.virtual
        raise TranslationError(f"sample guest: virtual address {va:#x} is not mapped")

    def _write(self, va: int, data: bytes) -> None:
        """Place ``data`` at a virtual address, page by page, in the image."""
        done = 0
        while done < len(data):
            piece = min(len(data) - done, PAGE_SIZE - (va + done) % PAGE_SIZE)
            offset = self.virtual_to_physical(va + done) - IMAGE_BASE
            self._image[offset:offset + piece] = data[done:done + piece]
            done += piece

    def _write_u64(self, va: int, *values: int) -> None:
        self._write(va, struct.pack(f"<{len(values)}Q", *values))

    # -- kernel structures --------------------------------------------------------------------

    def _place_kernel_variables(self) -> None:
        self.ps_loaded_module_list = _VARIABLES
        self.ps_active_process_head = _VARIABLES + 0x10
        self.ki_bugcheck_data = _VARIABLES + 0x20
        self.ki_wait_never_address = _VARIABLES + 0x50
        self.ki_wait_always_address = _VARIABLES + 0x58
        self.kdp_data_block_encoded = _VARIABLES + 0x60
        self.mm_pfn_database = _VARIABLES + 0x68
        self.mm_physical_memory_block = _VARIABLES + 0x70
        self.ki_processor_block = _VARIABLES + 0x80
        self.ki_wait_never = KI_WAIT_NEVER
        self.ki_wait_always = KI_WAIT_ALWAYS
        for head in (self.ps_loaded_module_list, self.ps_active_process_head):
            self._write_u64(head, head, head)  # empty LIST_ENTRY: Flink = Blink = itself
        parameters = BUGCHECK_PARAMETERS if self.bugcheck_code else (0, 0, 0, 0)
        self._write_u64(self.ki_bugcheck_data, self.bugcheck_code, *parameters)
        self._write_u64(self.ki_wait_never_address, self.ki_wait_never)
        self._write_u64(self.ki_wait_always_address, self.ki_wait_always)
        self._write_u64(self.kdp_data_block_encoded, int(self.encoded_kdbg))
        self._write_u64(self.mm_pfn_database, PFN_DATABASE)
        self._write_u64(self.mm_physical_memory_block, _DESCRIPTOR)

    def _place_processors(self) -> None:
        self.kpcr_addresses = [LOW_MEMORY_ALIAS + IMAGE_BASE + _PCRS + v * SIZE_PCR for v in range(self.cpu_count)]
        self.kprcb_addresses = [kpcr + OFFSET_PCR_CONTAINED_PRCB for kpcr in self.kpcr_addresses]
        self.context_addresses = [_CONTEXTS + (v // 3) * PAGE_SIZE + (v % 3) * _CONTEXT_STRIDE
                                  for v in range(self.cpu_count)]
        self.windows_processor_numbers = [self.processor_order.index(v) for v in range(self.cpu_count)]
        for v, (kpcr, kprcb) in enumerate(zip(self.kpcr_addresses, self.kprcb_addresses)):
            self._write_u64(kpcr + OFFSET_PCR_SELF, kpcr)
            self._write_u64(kpcr + OFFSET_PCR_CURRENT_PRCB, kprcb)
            self._write(kprcb + OFFSET_PRCB_NUMBER, struct.pack("<H", self.windows_processor_numbers[v]))
            self._write_u64(kprcb + OFFSET_PRCB_CONTEXT, self.context_addresses[v])
            self._write(self.context_addresses[v], self._stale_context(v).tobytes())
        self._write_u64(self.ki_processor_block, *(self.kprcb_addresses[v] for v in self.processor_order))

    def _stale_context(self, v: int) -> np.ndarray:
        """What vCPU ``v`` last saved at boot: differs from :attr:`cpu_states` in every GPR."""
        registers = {name: KERNEL_BASE + 0x10000 + v * 0x100 + i * 8 for i, name in enumerate(_GPR_NAMES)}
        registers.update(KERNEL_SELECTORS, rip=KERNEL_BASE + 0x4242 + v, rflags=0x246, mxcsr=MXCSR_DEFAULT)
        return context_from_registers(registers)

    def _place_kdbg(self) -> None:
        kdbg = np.zeros((), dtype=KDDEBUGGER_DATA64)
        kdbg["OwnerTag"] = OWNER_TAG
        kdbg["Size"] = KDBG_SIZE
        kdbg["KernBase"] = KERNEL_BASE
        kdbg["PsLoadedModuleList"] = self.ps_loaded_module_list
        kdbg["PsActiveProcessHead"] = self.ps_active_process_head
        kdbg["KiBugcheckData"] = self.ki_bugcheck_data
        kdbg["MmPfnDatabase"] = self.mm_pfn_database
        kdbg["KiProcessorBlock"] = self.ki_processor_block
        kdbg["MmPhysicalMemoryBlock"] = self.mm_physical_memory_block
        kdbg["SizePrcb"] = SIZE_PRCB
        kdbg["OffsetPrcbNumber"] = OFFSET_PRCB_NUMBER
        kdbg["SizePcr"] = SIZE_PCR
        kdbg["OffsetPcrContainedPrcb"] = OFFSET_PCR_CONTAINED_PRCB
        kdbg["OffsetPrcbContext"] = OFFSET_PRCB_CONTEXT
        plain = kdbg.tobytes().ljust(KDBG_SIZE, b"\0")
        self.kdbg_address = _KDBG
        if self.encoded_kdbg:
            self.decoded_kdbg_address = _DECODED_KDBG
            self._write(_KDBG, encode_kdbg(plain, self.ki_wait_never, self.ki_wait_always,
                                           self.kdp_data_block_encoded))
        else:
            self.decoded_kdbg_address = _KDBG
        self._write(self.decoded_kdbg_address, plain)

    def _place_kuser_shared_data(self) -> None:
        self._write(KUSER_SHARED_DATA + 0x08, _ksystem_time(INTERRUPT_TIME))
        self._write(KUSER_SHARED_DATA + 0x14, _ksystem_time(SYSTEM_TIME))
        self._write(KUSER_SHARED_DATA + 0x264, struct.pack("<I", NT_PRODUCT_WIN_NT))
        self._write(KUSER_SHARED_DATA + 0x2D0, struct.pack("<I", SUITE_MASK))

    def windows_runs(self) -> np.ndarray:
        """``(N, 2)`` [BasePage, PageCount]: RAM as Windows reports it, without page 0 and the
        legacy 0xA0000-0x100000 area."""
        ram = _subtract(_subtract(self.ram, 0, PAGE_SIZE), 0xA0000, 0x100000)
        return np.stack([ram[:, 0], ram[:, 1] - ram[:, 0]], axis=1) >> np.uint64(PAGE_SHIFT)

    def _published_header(self) -> np.ndarray:
        """The header the driver captured at boot: "PAGE" filler under the fields Windows sets."""
        header = _header_from_bytes(SIGNATURE * (DUMP_HEADER64.itemsize // 4))
        header["ValidDump"] = VALID_DUMP64
        header["MajorVersion"] = 0xF
        header["MinorVersion"] = 19041
        header["DirectoryTableBase"] = self.directory_table_base
        header["PfnDatabase"] = PFN_DATABASE  # stale: QEMU replaces it with KDBG.MmPfnDatabase
        header["PsLoadedModuleList"] = self.ps_loaded_module_list
        header["PsActiveProcessHead"] = self.ps_active_process_head
        header["MachineImageType"] = IMAGE_FILE_MACHINE_AMD64
        header["NumberProcessors"] = self.cpu_count
        header["BugCheckCode"] = 0
        for i in range(1, 5):
            header[f"BugCheckParameter{i}"] = 0
        if self.encoded_kdbg:
            header["BugCheckParameter1"] = self.decoded_kdbg_address
        header["KdDebuggerDataBlock"] = self.kdbg_address
        set_header_runs(header, self.windows_runs())
        boot_context = self._stale_context(self.processor_order[0])
        header["ContextRecord"][:CONTEXT.itemsize] = np.frombuffer(boot_context.tobytes(), dtype=np.uint8)
        header["Exception"] = np.zeros((), dtype=EXCEPTION_RECORD64)
        header["DumpType"] = DUMP_TYPE_FULL
        # Stale: Windows sized the dump at boot from all of RAM, page 0 and the legacy area included.
        header["RequiredDumpSpace"] = DUMP_HEADER64.itemsize + int((self.ram[:, 1] - self.ram[:, 0]).sum())
        header["SystemTime"] = SYSTEM_TIME - INTERRUPT_TIME + HEADER_UPTIME
        header["SystemUpTime"] = HEADER_UPTIME
        return header

    def _memory_descriptor(self) -> bytes:
        """nt's PHYSICAL_MEMORY_DESCRIPTOR: NumberOfRuns, NumberOfPages, then the runs."""
        runs = self.windows_runs()
        return struct.pack("<IIQ", len(runs), 0, int(runs[:, 1].sum())) + runs.astype("<u8").tobytes()

    @property
    def header(self) -> np.ndarray:
        """A writable copy of the published DUMP_HEADER64 (0-d), as the note carries it."""
        return _header_from_bytes(self._header.tobytes())

    # -- vCPUs and boot parameters ------------------------------------------------------------

    def _registers(self, v: int) -> dict[str, int]:
        """What vCPU ``v`` loads before halting; every value differs between vCPUs."""
        registers = {name: 0x5744_0000_0000_0000 | v << 16 | i << 8 for i, name in enumerate(_GPR_NAMES)}
        registers["rsp"] = KERNEL_DATA + 0x100000 - v * 0x6000 - 0x28  # canonical, an idle stack's shape
        registers["rflags"] = 0x2 | 0x40 | 0x4 | (v & 1) | (v & 2) << 6 | (v & 4) << 9  # CF, SF, OF vary; IF clear
        registers["gs_base"] = self.kpcr_addresses[v]
        registers["kernel_gs_base"] = 0
        registers["fs_base"] = 0
        for i in range(4):
            registers[f"dr{i}"] = KERNEL_BASE + 0x8000 + v * 0x40 + i * 8  # never executed
        registers["dr7"] = 0x400 | (v + 1)  # L0/G0/L1/G1 enables, execute breakpoints
        registers["mxcsr"] = MXCSR_DEFAULT | (v & 3) << 13 | (v & 4) << 13  # rounding control, FZ
        for i in range(16):
            registers[f"xmm{i}"] = int.from_bytes(bytes([0x80 | v, i] + [(k * 0x11 + v + i) & 0xFF for k in range(14)]),
                                                  "little")
        return registers

    def _cpu_state(self, v: int) -> CpuState:
        return CpuState(v, {**self._registers(v), **KERNEL_SELECTORS, "cr3": self.directory_table_base})

    def _boot_params(self, keep_running: bool) -> np.ndarray:
        params = np.zeros((), dtype=BOOT_PARAMS)
        params["Magic"] = BOOT_MAGIC
        params["Cr3"] = self.directory_table_base
        params["CpuCount"] = self.cpu_count
        params["NoteSize"] = len(self.note)
        params["NoteAddress"] = self.note_address
        params["StampRangeCount"] = len(self.stamp_ranges)
        params["Flags"] = BOOT_FLAG_KEEP_RUNNING if keep_running else 0
        params["BusyAddress"] = self.busy_address
        params["StampRanges"][:len(self.stamp_ranges)] = self.stamp_ranges
        for v in range(self.cpu_count):
            registers, cpu = self._registers(v), params["Cpu"][v]
            cpu["Gpr"] = [registers[name] for name in _BOOT_GPR_ORDER]
            cpu["Rflags"] = registers["rflags"]
            cpu["GsBase"] = registers["gs_base"]
            cpu["KernelGsBase"] = registers["kernel_gs_base"]
            cpu["FsBase"] = registers["fs_base"]
            cpu["Dr"] = [registers[f"dr{i}"] for i in range(4)]
            cpu["Dr7"] = registers["dr7"]
            cpu["MxCsr"] = registers["mxcsr"]
            cpu["Xmm"] = [list(registers[f"xmm{i}"].to_bytes(16, "little")) for i in range(16)]
        return params

    # -- physical memory ----------------------------------------------------------------------

    def readinto(self, address: int, buffer: memoryview | bytearray) -> None:
        """Fill ``buffer`` with the model's physical memory from ``address``: the image, stamps on
        the stamped pages, zeros elsewhere; SourceError unless the range lies in one RAM range."""
        out = np.frombuffer(buffer, dtype=np.uint8)
        end = address + len(out)
        i = int(np.searchsorted(self.ram[:, 0], np.uint64(max(address, 0)), side="right")) - 1
        if address < 0 or i < 0 or end > int(self.ram[i, 1]):
            raise SourceError(f"sample guest: physical range {address:#x}-{end:#x} is not in guest RAM")
        out[:] = 0
        low, high = max(address, IMAGE_BASE), min(end, IMAGE_BASE + _IMAGE_SIZE)
        if low < high:
            out[low - address:high - address] = self._image_bytes[low - IMAGE_BASE:high - IMAGE_BASE]
        if not len(out):
            return
        pfns = np.arange(address >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1, dtype=np.uint64)
        pfns = pfns[_inside(self.stamp_ranges, pfns << np.uint64(PAGE_SHIFT))]
        stamps = np.empty((len(pfns), 2), dtype="<u8")
        stamps[:, 0], stamps[:, 1] = pfns, STAMP_MAGIC
        positions = (pfns.astype(np.int64) << PAGE_SHIFT)[:, None] - address + np.arange(16)
        wanted = (positions >= 0) & (positions < len(out))
        out[positions[wanted]] = stamps.view(np.uint8).reshape(-1, 16)[wanted]

    def read(self, address: int, length: int) -> bytes:
        """``length`` bytes of the model's physical memory from ``address``."""
        buffer = bytearray(length)
        self.readinto(address, buffer)
        return bytes(buffer)


_GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_BOOT_GPR_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                   "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
