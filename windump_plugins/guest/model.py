"""One model of a crashed Windows x64 guest: the memory the ``sample:`` source serves, the fixtures
of the unit tests, and the structures the bare-metal test guest in ``drivers/`` boots with.

:class:`CrashedGuest` places everything a dump path reads into one *image* loaded at
:data:`IMAGE_BASE`: the boot parameters (:mod:`.boot`), the VMCOREINFO note with the header the
driver published at boot, 4-level page tables (:mod:`.pagetables`), the KDBG (plain or encoded),
the kernel variables it points at, one KPCR/KPRCB per vCPU and their CONTEXT areas, and
KUSER_SHARED_DATA, where :mod:`.layout` says. Every other page of RAM from 2 MiB up is *stamped*
(its first 16 bytes are its PFN and :data:`STAMP_MAGIC`), the rest is zero (:mod:`.ram`).

The page tables use all three page sizes on the dump path: the kernel's variables sit in a 2 MiB
page, the KDBG, the processor CONTEXTs and the memory descriptor in 4 KiB pages (the KDBG straddles
two of them, mapped in reverse physical order unless ``forward_kernel_data``), the KPCRs in a 1 GiB
page aliasing low memory. Leaf entries outside the identity map carry NX, so the test guest must set
EFER.NXE (and its CPU must offer 1 GiB pages, e.g. ``-cpu max``) before it loads
:attr:`CrashedGuest.directory_table_base`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from ..formats.context import CONTEXT, MXCSR_DEFAULT, context_from_registers
from ..formats.dumpheader import (
    DUMP_HEADER64,
    DUMP_TYPE_FULL,
    EXCEPTION_RECORD64,
    IMAGE_FILE_MACHINE_AMD64,
    PAGE_SHIFT,
    PAGE_SIZE,
    SIGNATURE,
    VALID_DUMP64,
    set_header_runs,
)
from ..formats.kdbg import KDDEBUGGER_DATA64, OWNER_TAG, encode_kdbg
from ..formats.kuser import KUSER_SHARED_DATA
from ..source import CpuState
from .boot import (
    BOOT_FLAG_KEEP_RUNNING,
    BOOT_MAGIC,
    BOOT_PARAMS,
    GUEST_RESERVED_END,
    IMAGE_BASE,
    KERNEL_SELECTORS,
    MAX_CPUS,
    STAMP_MAGIC,
    boot_params,
    stamp_page,
)
from .layout import (
    BUGCHECK_PARAMETERS,
    CONTEXT_STRIDE,
    CONTEXTS,
    DECODED_KDBG,
    DESCRIPTOR,
    HEADER_UPTIME,
    IMAGE_KERNEL,
    IMAGE_KERNEL_DATA,
    IMAGE_KUSER,
    IMAGE_NOTE,
    IMAGE_PCRS,
    IMAGE_SIZE,
    IMAGE_TABLES,
    INTERRUPT_TIME,
    KDBG,
    KDBG_SIZE,
    KERNEL_BASE,
    KERNEL_DATA,
    KERNEL_DATA_PAGES,
    KI_WAIT_ALWAYS,
    KI_WAIT_NEVER,
    LOW_MEMORY_ALIAS,
    NT_PRODUCT_WIN_NT,
    OFFSET_PCR_CONTAINED_PRCB,
    OFFSET_PCR_CURRENT_PRCB,
    OFFSET_PCR_SELF,
    OFFSET_PRCB_CONTEXT,
    OFFSET_PRCB_NUMBER,
    PFN_DATABASE,
    SIZE_PCR,
    SIZE_PRCB,
    SUITE_MASK,
    SYSTEM_TIME,
    VARIABLES,
)
from .pagetables import (
    HUGE_PAGE,
    LARGE_PAGE,
    PTE_ADDRESS,
    PTE_LARGE,
    PTE_NX,
    PTE_PRESENT,
    PTE_WRITABLE,
    Mapping,
    PageTables,
)
from .ram import SAMPLE_RAM, BootedRam, inside, pc_ram, ram_ranges, subtract

#: What importers have always found here, wherever it is defined now.
__all__ = [
    "BOOT_FLAG_KEEP_RUNNING", "BOOT_MAGIC", "BOOT_PARAMS", "BUGCHECK_PARAMETERS", "HEADER_UPTIME", "IMAGE_BASE",
    "INTERRUPT_TIME", "KDBG_SIZE", "KERNEL_BASE", "KERNEL_DATA", "KERNEL_SELECTORS", "KI_WAIT_ALWAYS",
    "KI_WAIT_NEVER", "KUSER_SHARED_DATA", "LOW_MEMORY_ALIAS", "MAX_CPUS", "NT_PRODUCT_WIN_NT",
    "OFFSET_PCR_CONTAINED_PRCB", "OFFSET_PCR_CURRENT_PRCB", "OFFSET_PCR_SELF", "OFFSET_PRCB_CONTEXT",
    "OFFSET_PRCB_NUMBER", "PFN_DATABASE", "PTE_ADDRESS", "PTE_LARGE", "PTE_NX", "PTE_PRESENT", "PTE_WRITABLE",
    "SAMPLE_RAM", "SIZE_PCR", "SIZE_PRCB", "STAMP_MAGIC", "SUITE_MASK", "SYSTEM_TIME", "CrashedGuest", "Mapping",
    "pc_ram", "stamp_page",
]

_NOTE_NAME = b"VMCOREINFO\0"

_GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


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
    ``busy_address`` after publishing. ``forward_kernel_data`` maps the KERNEL_DATA pages in forward
    physical order, so the KDBG straddles two physically contiguous pages, as it does in about one
    placement in five on real Windows (by default they are mapped in reverse order, and no read
    through them spans two physical pages). Bad arguments raise ValueError.

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
                 keep_running: bool = False, forward_kernel_data: bool = False) -> None:
        if not 1 <= cpus <= MAX_CPUS:
            raise ValueError(f"the model has 1 to {MAX_CPUS} vCPUs, not {cpus}")
        order = tuple(range(cpus)) if processor_order is None else tuple(int(v) for v in processor_order)
        if sorted(order) != list(range(cpus)):
            raise ValueError(f"processor_order {order} is not a permutation of the {cpus} vCPUs")
        self.ram = ram_ranges(ram)
        self.image_base = IMAGE_BASE
        if not inside(self.ram, np.array([IMAGE_BASE, IMAGE_BASE + IMAGE_SIZE - 1], dtype=np.uint64)).all():
            raise ValueError(f"RAM must hold the model's image at {IMAGE_BASE:#x}-{IMAGE_BASE + IMAGE_SIZE:#x}")
        self.cpu_count = cpus
        self.processor_order = order
        self.encoded_kdbg = encoded_kdbg
        self.bugcheck_code = bugcheck_code
        self.forward_kernel_data = forward_kernel_data
        self._image = bytearray(IMAGE_SIZE)
        self._tables = PageTables(self._image, IMAGE_BASE, IMAGE_BASE + IMAGE_TABLES, IMAGE_BASE + IMAGE_KUSER)
        self.directory_table_base = self._tables.directory_table_base
        self.mappings = self._tables.mappings
        self._map_memory()

        self.stamp_ranges = subtract(subtract(self.ram, 0, GUEST_RESERVED_END), IMAGE_BASE, IMAGE_BASE + IMAGE_SIZE)
        self.busy_address = int(self.stamp_ranges[0, 0])
        self.kernel_base = KERNEL_BASE
        self._place_kernel_variables()
        self._place_processors()
        self._place_kdbg()
        self._place_kuser_shared_data()
        self._header = self._published_header()
        self._write(DESCRIPTOR, self._memory_descriptor())
        self.note_address = IMAGE_BASE + IMAGE_NOTE
        self.note = struct.pack("<III", len(_NOTE_NAME), self._header.nbytes, 0) + _NOTE_NAME.ljust(12, b"\0")
        self.note += self._header.tobytes()
        self._image[IMAGE_NOTE:IMAGE_NOTE + len(self.note)] = self.note
        registers = [self._registers(v) for v in range(cpus)]
        self.cpu_states = [CpuState(v, {**r, **KERNEL_SELECTORS, "cr3": self.directory_table_base})
                           for v, r in enumerate(registers)]
        self.boot_params = boot_params(cr3=self.directory_table_base, note=self.note, note_address=self.note_address,
                                       stamp_ranges=self.stamp_ranges, busy_address=self.busy_address,
                                       keep_running=keep_running, registers=registers)
        self._image[:BOOT_PARAMS.itemsize] = self.boot_params.tobytes()
        self.image = bytes(self._image)
        self._memory = BootedRam(self.ram, IMAGE_BASE, self.image, self.stamp_ranges)
        for array in (self.ram, self.stamp_ranges, self.boot_params):
            array.flags.writeable = False

    # -- address space ------------------------------------------------------------------------

    def _map_memory(self) -> None:
        tables = self._tables
        tables.map(0, 0, 512 * HUGE_PAGE, HUGE_PAGE, PTE_WRITABLE)  # PML4 slot 0: identity
        tables.map(KERNEL_BASE, IMAGE_BASE + IMAGE_KERNEL, LARGE_PAGE, LARGE_PAGE, PTE_WRITABLE)
        for page in range(KERNEL_DATA_PAGES):
            frame = page if self.forward_kernel_data else KERNEL_DATA_PAGES - 1 - page
            tables.map(KERNEL_DATA + page * PAGE_SIZE, IMAGE_BASE + IMAGE_KERNEL_DATA + frame * PAGE_SIZE,
                       PAGE_SIZE, PAGE_SIZE, PTE_WRITABLE | PTE_NX)
        tables.map(KUSER_SHARED_DATA, IMAGE_BASE + IMAGE_KUSER, PAGE_SIZE, PAGE_SIZE, PTE_WRITABLE | PTE_NX)
        tables.map(LOW_MEMORY_ALIAS, 0, HUGE_PAGE, HUGE_PAGE, PTE_WRITABLE | PTE_NX)

    def virtual_to_physical(self, va: int) -> int:
        """Where ``va`` lies, from the model's own bookkeeping (not a page-table walk)."""
        return self._tables.virtual_to_physical(va)

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
        self.ps_loaded_module_list = VARIABLES
        self.ps_active_process_head = VARIABLES + 0x10
        self.ki_bugcheck_data = VARIABLES + 0x20
        self.ki_wait_never_address = VARIABLES + 0x50
        self.ki_wait_always_address = VARIABLES + 0x58
        self.kdp_data_block_encoded = VARIABLES + 0x60
        self.mm_pfn_database = VARIABLES + 0x68
        self.mm_physical_memory_block = VARIABLES + 0x70
        self.ki_processor_block = VARIABLES + 0x80
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
        self._write_u64(self.mm_physical_memory_block, DESCRIPTOR)

    def _place_processors(self) -> None:
        self.kpcr_addresses = [LOW_MEMORY_ALIAS + IMAGE_BASE + IMAGE_PCRS + v * SIZE_PCR for v in range(self.cpu_count)]
        self.kprcb_addresses = [kpcr + OFFSET_PCR_CONTAINED_PRCB for kpcr in self.kpcr_addresses]
        self.context_addresses = [CONTEXTS + (v // 3) * PAGE_SIZE + (v % 3) * CONTEXT_STRIDE
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
        self.kdbg_address = KDBG
        if self.encoded_kdbg:
            self.decoded_kdbg_address = DECODED_KDBG
            self._write(KDBG, encode_kdbg(plain, self.ki_wait_never, self.ki_wait_always, self.kdp_data_block_encoded))
        else:
            self.decoded_kdbg_address = KDBG
        self._write(self.decoded_kdbg_address, plain)

    def _place_kuser_shared_data(self) -> None:
        self._write(KUSER_SHARED_DATA + 0x08, _ksystem_time(INTERRUPT_TIME))
        self._write(KUSER_SHARED_DATA + 0x14, _ksystem_time(SYSTEM_TIME))
        self._write(KUSER_SHARED_DATA + 0x264, struct.pack("<I", NT_PRODUCT_WIN_NT))
        self._write(KUSER_SHARED_DATA + 0x2D0, struct.pack("<I", SUITE_MASK))

    def windows_runs(self) -> np.ndarray:
        """``(N, 2)`` [BasePage, PageCount]: RAM as Windows reports it, without page 0 and the
        legacy 0xA0000-0x100000 area."""
        ram = subtract(subtract(self.ram, 0, PAGE_SIZE), 0xA0000, 0x100000)
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

    # -- vCPUs ----------------------------------------------------------------------------------

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

    # -- physical memory ----------------------------------------------------------------------

    def readinto(self, address: int, buffer: memoryview | bytearray) -> None:
        """Fill ``buffer`` with the model's physical memory from ``address``: the image, stamps on
        the stamped pages, zeros elsewhere; SourceError unless the range lies in one RAM range."""
        self._memory.readinto(address, buffer)

    def read(self, address: int, length: int) -> bytes:
        """``length`` bytes of the model's physical memory from ``address``."""
        buffer = bytearray(length)
        self.readinto(address, buffer)
        return bytes(buffer)
