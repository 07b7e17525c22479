"""Matching vCPUs to Windows processors through their KPCRs (not by index), the warnings and errors
when they do not match, and the CONTEXT overlays at each processor's context address."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from windump_plugins.formats.context import CONTEXT, CONTEXT_ALL_AMD64
from windump_plugins.errors import WindumpError
from windump_plugins.formats.dumpheader import PAGE_SIZE
from windump_plugins.guest.model import KERNEL_DATA, OFFSET_PCR_CONTAINED_PRCB, CrashedGuest
from windump_plugins.errors import WindumpWarning
from windump_plugins.formats.kdbg import KDDEBUGGER_DATA64
from windump_plugins.paging import AddressSpace
from windump_plugins.processors import context_overlays, find_processors, virtual_overlays
from windump_plugins.source import CpuState
from windump_plugins.sources.sample import SampleSource

#: A user-mode TEB address, as GS base holds in user mode.
USER_TEB = 0x0000_00A1_2345_6000


def setup(guest: CrashedGuest):
    space = AddressSpace(SampleSource(guest), guest.directory_table_base)
    return space, space.read_struct(guest.decoded_kdbg_address, KDDEBUGGER_DATA64)


def cpus_of(guest: CrashedGuest) -> list[CpuState]:
    return [CpuState(state.index, dict(state.registers)) for state in guest.cpu_states]


@pytest.mark.parametrize("order", [(0,), (0, 1), (3, 1, 0, 2), (1, 2, 3, 0)])
def test_each_vcpu_is_matched_to_the_processor_its_kpcr_holds(order):
    guest = CrashedGuest(cpus=len(order), processor_order=order)
    space, kdbg = setup(guest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = find_processors(cpus_of(guest), space, kdbg, len(order))
    assert found.kprcbs == tuple(guest.kprcb_addresses[v] for v in order)
    assert [(p.number, p.cpu.index) for p in found.processors] == [(n, v) for n, v in enumerate(order)]
    for p in found.processors:
        assert p.kprcb == guest.kprcb_addresses[p.cpu.index]
        assert p.context_address == guest.context_addresses[p.cpu.index]


def test_kernel_gs_base_holds_the_kpcr_of_a_vcpu_in_user_mode():
    guest = CrashedGuest(cpus=2, processor_order=(1, 0))
    space, kdbg = setup(guest)
    cpus = cpus_of(guest)
    cpus[1].registers.update(gs_base=USER_TEB, kernel_gs_base=guest.kpcr_addresses[1])
    found = find_processors(cpus, space, kdbg, 2)
    assert [(p.number, p.cpu.index) for p in found.processors] == [(0, 1), (1, 0)]


def test_a_vcpu_without_a_kprcb_is_left_out_with_a_warning():
    """Windows runs on two processors, QEMU has three vCPUs: the third (never started by Windows,
    GS bases zero) gets no CONTEXT, and the count stays Windows' two."""
    guest = CrashedGuest(cpus=2)
    space, kdbg = setup(guest)
    cpus = cpus_of(guest) + [CpuState(2, {"gs_base": 0, "kernel_gs_base": 0, "rip": 0xFFF0})]
    with pytest.warns(WindumpWarning, match=r"vCPU 2 runs no Windows processor .*gs_base 0x0, kernel_gs_base 0x0"):
        found = find_processors(cpus, space, kdbg, 2)
    assert len(found.kprcbs) == 2
    assert [p.cpu.index for p in found.processors] == [0, 1]


def test_a_kernel_address_that_is_no_kpcr_matches_nothing():
    guest = CrashedGuest(cpus=2)
    space, kdbg = setup(guest)
    cpus = cpus_of(guest)
    cpus[0].registers["gs_base"] = guest.kpcr_addresses[0] + 0x10
    with pytest.warns(WindumpWarning, match="vCPU 0 runs no Windows processor"):
        found = find_processors(cpus, space, kdbg, 2)
    assert [p.cpu.index for p in found.processors] == [1]


def test_two_vcpus_claiming_one_kprcb_write_neither():
    guest = CrashedGuest(cpus=3)
    space, kdbg = setup(guest)
    cpus = cpus_of(guest)
    cpus[2].registers["gs_base"] = guest.kpcr_addresses[0]
    with pytest.warns(WindumpWarning, match=r"vCPUs 0, 2 all claim Windows processor 0"):
        found = find_processors(cpus, space, kdbg, 3)
    assert [(p.number, p.cpu.index) for p in found.processors] == [(1, 1)]


def test_processors_beyond_the_guests_published_count_are_found():
    """A header captured at boot with fewer processors than KiProcessorBlock lists now."""
    guest = CrashedGuest(cpus=4)
    space, kdbg = setup(guest)
    found = find_processors(cpus_of(guest), space, kdbg, 2)
    assert len(found.kprcbs) == 4 and len(found.processors) == 4


@pytest.mark.parametrize("count", [0, 0x45474150])
def test_a_nonsense_processor_count_is_an_error(count):
    guest = CrashedGuest(cpus=1)
    space, kdbg = setup(guest)
    cpus = [] if count == 0 else cpus_of(guest)
    with pytest.raises(WindumpError, match=f"NumberProcessors is {count:#x}, not a processor count"):
        find_processors(cpus, space, kdbg, count)


def test_unreadable_processor_block_is_an_error():
    guest = CrashedGuest(cpus=1)
    space, kdbg = setup(guest)
    kdbg["KiProcessorBlock"] = 0xFFFF_E000_0000_0000
    with pytest.raises(WindumpError, match="KiProcessorBlock at 0xffffe00000000000 is not readable"):
        find_processors(cpus_of(guest), space, kdbg, 1)


def test_virtual_overlays_split_at_a_page_into_a_distant_page():
    """KERNEL_DATA's pages lie in reverse physical order: bytes crossing a page boundary go to two
    pages that are not next to each other."""
    guest = CrashedGuest(cpus=1)
    space, _ = setup(guest)
    data = bytes(range(0x30))
    pieces = virtual_overlays(space, KERNEL_DATA + PAGE_SIZE - 0x10, data)
    first, second = guest.virtual_to_physical(KERNEL_DATA + PAGE_SIZE - 0x10), guest.virtual_to_physical(KERNEL_DATA + PAGE_SIZE)
    assert second != first + 0x10
    assert pieces == [(first, data[:0x10]), (second, data[0x10:])]
    assert virtual_overlays(space, KERNEL_DATA + 0x20, data) == [(guest.virtual_to_physical(KERNEL_DATA + 0x20), data)]


def test_context_overlays_hold_each_vcpus_registers_at_its_context():
    guest = CrashedGuest(cpus=3, processor_order=(2, 0, 1))
    space, kdbg = setup(guest)
    found = find_processors(cpus_of(guest), space, kdbg, 3)
    overlays = context_overlays(space, found.processors)
    by_address = dict(overlays)
    for vcpu, address in enumerate(guest.context_addresses):
        context = np.frombuffer(by_address[guest.virtual_to_physical(address)], dtype=CONTEXT)[0]
        registers = guest.cpu_states[vcpu].registers
        assert int(context["ContextFlags"]) == CONTEXT_ALL_AMD64
        assert (int(context["Rsp"]), int(context["R15"]), int(context["Dr7"])) == \
            (registers["rsp"], registers["r15"], registers["dr7"])
        assert int(context["MxCsr"]) == int(context["FltSave"]["MxCsr"]) == registers["mxcsr"]


def test_a_context_that_does_not_translate_is_an_error():
    guest = CrashedGuest(cpus=1)
    space, kdbg = setup(guest)
    (processor,) = find_processors(cpus_of(guest), space, kdbg, 1).processors
    moved = type(processor)(processor.number, processor.kprcb, 0xFFFF_E000_0000_0000, processor.cpu)
    with pytest.raises(WindumpError, match="processor 0: its CONTEXT at 0xffffe00000000000 is not in the dump"):
        context_overlays(space, [moved])


def test_kpcr_offset_is_the_kdbgs():
    """The KPRCB is KPCR + KDBG.OffsetPcrContainedPrcb, whatever that offset is."""
    guest = CrashedGuest(cpus=1)
    space, kdbg = setup(guest)
    assert int(kdbg["OffsetPcrContainedPrcb"]) == OFFSET_PCR_CONTAINED_PRCB
    cpus = cpus_of(guest)
    kdbg["OffsetPcrContainedPrcb"] = OFFSET_PCR_CONTAINED_PRCB + 8
    cpus[0].registers["gs_base"] -= 8
    assert [p.cpu.index for p in find_processors(cpus, space, kdbg, 1).processors] == [0]
