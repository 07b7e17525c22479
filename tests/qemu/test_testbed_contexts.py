"""Complete dumps of the QEMU test bed: windump's dump made from QEMU's ELF carries, in every
processor's CONTEXT and in the header, exactly the registers QEMU's ``info registers`` shows for
the vCPU that runs that processor, however KiProcessorBlock orders them, and both readers see them."""

from __future__ import annotations

import numpy as np
import pytest
from qemu_guest import VARIANTS, Machine, Variant
from readers import PAGE_MASK, kdmp_read, volatility_read
from test_contexts import GPRS, processor_contexts

from windump_plugins.dumpfile import DumpFile
from windump_plugins.formats.context import (
    CONTEXT,
    CONTEXT_AMD64,
    CONTEXT_CONTROL,
    CONTEXT_INTEGER,
    CONTEXT_SEGMENTS,
)
from windump_plugins.fresh import STATUS_BREAKPOINT
from windump_plugins.guest.model import SYSTEM_TIME

pytestmark = pytest.mark.qemu

VARIANT = {variant.name: variant for variant in VARIANTS}

#: KiProcessorBlock in an order unlike QEMU's CPU order.
REORDERED = Variant("pc-256M-4cpu-reordered", Machine("pc", "256M", 4), {"processor_order": (2, 0, 3, 1)})

CONTEXT_VARIANTS = [VARIANT["pc-256M-1cpu"], VARIANT["pc-256M-2cpu-encoded-kdbg"], VARIANT["q35-256M-4cpu"], REORDERED]

#: What QEMU's ELF CPU notes give: GPRs, RIP, RFLAGS and selectors; no debug, x87 or SSE state.
ELF_CONTEXT_FLAGS = CONTEXT_CONTROL | CONTEXT_INTEGER | CONTEXT_SEGMENTS
SELECTORS = ("cs", "ds", "es", "fs", "gs", "ss")


@pytest.fixture(params=CONTEXT_VARIANTS, ids=lambda v: v.name)
def saved(request, booted_once, run_windump, tmp_path):
    """windump's dump of the stopped guest from QEMU's ELF, with every vCPU's ``info registers``."""
    booted = booted_once(request.param)
    registers = booted.qemu.registers()
    elf = booted.qemu.dump(tmp_path / "guest.elf", "elf")
    dump = tmp_path / "windump.dmp"
    result = run_windump("save", "--quiet", str(elf), str(dump), timeout=300)
    assert result.returncode == 0 and dump.exists(), result.stderr
    assert "warning" not in result.stderr, result.stderr
    return booted, registers, dump


def expected_context(seen: dict[str, int]) -> dict[str, int]:
    """CONTEXT fields as ``info registers`` shows the vCPU."""
    expected = {name.capitalize(): seen[name] for name in (*GPRS, "rip")}
    expected.update({f"Seg{name.capitalize()}": seen[name] for name in SELECTORS})
    expected.update(ContextFlags=ELF_CONTEXT_FLAGS, EFlags=seen["rflags"])
    return expected


def fields(context: np.void, names) -> dict[str, int]:
    return {name: int(context[name]) for name in names}


def test_every_processor_context_holds_its_vcpus_registers(saved):
    booted, registers, dump = saved
    model = booted.model
    with DumpFile(dump) as opened:
        assert int(opened.header["NumberProcessors"]) == model.cpu_count
        contexts = processor_contexts(opened)
    for number, context in enumerate(contexts):
        vcpu = model.processor_order[number]
        expected = expected_context(registers[vcpu])
        assert fields(context, expected) == expected, f"processor {number} (vCPU {vcpu})"
        assert int(context["ContextFlags"]) & CONTEXT_AMD64
        assert int(context["MxCsr"]) == int(context["FltSave"]["MxCsr"]) == 0  # the ELF has no MXCSR


def test_header_context_is_the_halted_cpu0_and_kdmp_parser_agrees(saved):
    booted, registers, dump = saved
    expected = expected_context(registers[0])
    result = kdmp_read(dump)
    assert result.parsed, result.reason
    assert {name: result.context[name] for name in expected} == expected
    with DumpFile(dump) as opened:
        header = opened.header
    assert int(header["Exception"]["ExceptionCode"]) == STATUS_BREAKPOINT
    assert int(header["Exception"]["ExceptionAddress"]) == registers[0]["rip"]
    assert int(header["SystemTime"]) == SYSTEM_TIME


def test_readers_see_the_same_processor_contexts(saved):
    """kdmp-parser and volatility3 read each processor's CONTEXT pages as windump wrote them."""
    booted, registers, dump = saved
    model = booted.model
    pages = sorted({model.virtual_to_physical(a + o) & PAGE_MASK for a in model.context_addresses
                    for o in (0, CONTEXT.itemsize - 1)})
    views = {reader.__name__: reader(dump, pages) for reader in (kdmp_read, volatility_read)}
    for name, view in views.items():
        assert view.parsed, f"{name}: {view.reason}"
    for vcpu, address in enumerate(model.context_addresses):
        expected = expected_context(registers[vcpu])
        for name, view in views.items():
            raw = bytearray()
            for offset in range(0, CONTEXT.itemsize, 8):
                physical = model.virtual_to_physical(address + offset)
                raw += view.physical[physical & PAGE_MASK][physical & ~PAGE_MASK:][:8]
            context = np.frombuffer(bytes(raw), dtype=CONTEXT)[0]
            assert fields(context, expected) == expected, f"{name}: vCPU {vcpu}"
