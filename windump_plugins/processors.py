"""Which vCPU runs which Windows processor, found through each vCPU's KPCR, and the CONTEXT overlays
that put every vCPU's registers where its KPRCB points, in the dump only.

WinDbg shows a processor's registers from the CONTEXT that ``KPRCB + OffsetPrcbContext`` points at.
QEMU's ``-w`` assumes its CPU i is Windows processor i (``KiProcessorBlock[i]``); here a vCPU is
matched by address instead: its GS base (in kernel mode) or KERNEL_GS_BASE (in user mode, before
``swapgs``) holds its KPCR, and ``KPCR + OffsetPcrContainedPrcb`` must be a KiProcessorBlock entry.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import WindumpError, WindumpWarning
from .formats.context import context_from_registers
from .formats.dumpheader import PAGE_SIZE
from .paging import AddressSpace
from .source import CpuState
from .writer import Overlay

#: Registers that may hold a vCPU's KPCR: GS base in kernel mode, KERNEL_GS_BASE in user mode.
KPCR_REGISTERS = ("gs_base", "kernel_gs_base")

#: Processors Windows x64 supports at most (KiProcessorBlock has this many slots); a larger count
#: in the guest's header is not a processor count.
MAX_PROCESSORS = 2048

#: The lowest kernel-mode (canonical upper-half) x86-64 address.
KERNEL_SPACE = 0xFFFF_8000_0000_0000


@dataclass(frozen=True)
class Processor:
    """One Windows processor and the vCPU that runs it."""

    #: The processor's index in KiProcessorBlock.
    number: int
    #: The address of its KPRCB.
    kprcb: int
    #: The address of its CONTEXT (the pointer at ``KPRCB + OffsetPrcbContext``).
    context_address: int
    #: The registers of the vCPU running it.
    cpu: CpuState


@dataclass(frozen=True)
class ProcessorMap:
    """What :func:`find_processors` found: the processors KiProcessorBlock lists, and the matched ones."""

    #: KPRCB addresses of KiProcessorBlock's leading non-zero entries (Windows' processors now).
    kprcbs: tuple[int, ...]
    #: The processors a vCPU was matched to, by processor number.
    processors: tuple[Processor, ...]


def _warn(message: str) -> None:
    warnings.warn(message, WindumpWarning, stacklevel=3)


def is_kernel_address(address: int) -> bool:
    """Whether ``address`` is a canonical upper-half (kernel-mode) x86-64 address."""
    return KERNEL_SPACE <= address < 1 << 64


def processor_block_entries(space: AddressSpace, kdbg: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` entries of KiProcessorBlock (KPRCB addresses, 0 for an empty slot).

    Raises WindumpError when the array cannot be read.
    """
    block = int(kdbg["KiProcessorBlock"])
    try:
        return np.frombuffer(space.read(block, 8 * count), dtype="<u8")
    except WindumpError as error:
        raise WindumpError(f"KiProcessorBlock at {block:#x} is not readable: {error}") from None


def read_processor_block(space: AddressSpace, kdbg: np.ndarray, count: int) -> tuple[int, ...]:
    """The KPRCB addresses in KiProcessorBlock up to its first zero entry, reading ``count`` entries."""
    entries = processor_block_entries(space, kdbg, count)
    zeros = np.flatnonzero(entries == 0)
    return tuple(entries[: zeros[0] if zeros.size else count].tolist())


def _kprcb_of(cpu: CpuState, kprcbs: dict[int, int], offset_pcr_contained_prcb: int) -> int | None:
    """The KPRCB that ``cpu``'s GS base or KERNEL_GS_BASE leads to, or None (after a warning)."""
    tried = []
    for register in KPCR_REGISTERS:
        kpcr = cpu.registers.get(register)
        if kpcr is None:
            continue
        tried.append(f"{register} {kpcr:#x}")
        if is_kernel_address(kpcr) and kpcr + offset_pcr_contained_prcb in kprcbs:
            return kpcr + offset_pcr_contained_prcb
    held = ", ".join(tried) if tried else "the source gives neither GS base nor KERNEL_GS_BASE"
    _warn(f"vCPU {cpu.index} runs no Windows processor that KiProcessorBlock lists ({held}; KPRCB = KPCR + "
          f"{offset_pcr_contained_prcb:#x}): its registers go into no processor CONTEXT")
    return None


def find_processors(cpus: Sequence[CpuState], space: AddressSpace, kdbg: np.ndarray,
                    guest_count: int) -> ProcessorMap:
    """Match each vCPU to the Windows processor whose KPRCB its KPCR contains.

    ``guest_count`` is the NumberProcessors the guest published; KiProcessorBlock is read up to the
    larger of it and the vCPU count, and its leading non-zero entries are the processors. A vCPU
    that matches no KPRCB, and every vCPU of a KPRCB two of them claim, is left out with a warning
    (that KPRCB keeps the CONTEXT the guest saved). Raises WindumpError when KiProcessorBlock or a
    matched KPRCB cannot be read.
    """
    count = max(guest_count, len(cpus))
    if not 0 < count <= MAX_PROCESSORS:
        raise WindumpError(f"the guest's header says NumberProcessors is {guest_count:#x}, not a processor count "
                           f"(at most {MAX_PROCESSORS}), and the source has {len(cpus)} vCPUs")
    kprcbs = read_processor_block(space, kdbg, count)
    numbers = {kprcb: number for number, kprcb in enumerate(kprcbs)}
    offset_pcr_contained_prcb = int(kdbg["OffsetPcrContainedPrcb"])
    claims: dict[int, list[CpuState]] = {}
    for cpu in cpus:
        kprcb = _kprcb_of(cpu, numbers, offset_pcr_contained_prcb)
        if kprcb is not None:
            claims.setdefault(kprcb, []).append(cpu)

    processors = []
    offset_prcb_context = int(kdbg["OffsetPrcbContext"])
    for kprcb, claimants in sorted(claims.items(), key=lambda item: numbers[item[0]]):
        number = numbers[kprcb]
        if len(claimants) > 1:
            indexes = ", ".join(str(cpu.index) for cpu in claimants)
            _warn(f"vCPUs {indexes} all claim Windows processor {number} (KPRCB {kprcb:#x}): their KPCR "
                  f"registers disagree with the guest, so none of their registers go into its CONTEXT")
            continue
        try:
            context_address = space.read_u64(kprcb + offset_prcb_context)
        except WindumpError as error:
            raise WindumpError(f"processor {number}: the CONTEXT pointer at KPRCB {kprcb:#x} + "
                               f"OffsetPrcbContext {offset_prcb_context:#x} is not readable: {error}") from None
        processors.append(Processor(number, kprcb, context_address, claimants[0]))
    return ProcessorMap(kprcbs, tuple(processors))


def virtual_overlays(space: AddressSpace, address: int, data: bytes) -> list[Overlay]:
    """``data`` at guest virtual ``address`` as physical overlays, one per page it touches (a
    CONTEXT may cross into a page that is not physically next to the first)."""
    pages = np.arange(address & -PAGE_SIZE, address + len(data), PAGE_SIZE, dtype=np.uint64)
    pages[0] = address
    physical = space.translate(pages).tolist()
    starts = [int(page) - address for page in pages.tolist()]
    stops = starts[1:] + [len(data)]
    return [(target, data[start:stop]) for target, start, stop in zip(physical, starts, stops)]


def context_overlays(space: AddressSpace, processors: Sequence[Processor]) -> list[Overlay]:
    """Each processor's full CONTEXT, built from its vCPU's registers, as overlays at the physical
    pages of its context address. Raises WindumpError (TranslationError) when one does not translate."""
    overlays = []
    for processor in processors:
        context = context_from_registers(processor.cpu.registers).tobytes()
        try:
            overlays += virtual_overlays(space, processor.context_address, context)
        except WindumpError as error:
            raise WindumpError(f"processor {processor.number}: its CONTEXT at {processor.context_address:#x} "
                               f"is not in the dump: {error}") from None
    return overlays
