"""Complete dumps of the live QEMU test bed through its gdbstub: ``windump save gdb://`` puts in every
processor's CONTEXT exactly the registers of the vCPU that runs it, debug registers (from HMP)
included, as the model loaded them and as QEMU's ``info registers`` shows them, however
KiProcessorBlock orders the processors; and guest RAM, as QEMU's own ``pmemsave`` writes it, is
the same after the dump as before it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from readers import KDMP_CONTEXT_FIELDS, kdmp_read
from test_contexts import GPRS, processor_contexts
from test_gdb_command import gdb
from test_testbed_contexts import CONTEXT_VARIANTS, SELECTORS

from windump_plugins.dumpfile import DumpFile
from windump_plugins.formats.context import CONTEXT_ALL_AMD64

pytestmark = pytest.mark.qemu

XMMS = tuple(f"xmm{i}" for i in range(16))
#: What the model has each vCPU load before it halts (its RIP is wherever the guest halted).
LOADED = (*GPRS, "rflags", *SELECTORS, "dr0", "dr1", "dr2", "dr3", "dr7", "mxcsr", *XMMS)
#: What ``info registers`` shows besides: RIP, and DR6 as the CPU keeps it.
SHOWN = (*LOADED, "rip", "dr6")


@dataclass
class LiveDump:
    """One variant's ``windump save gdb://`` output, with what the guest looked like around it."""

    booted: object
    shown: list[dict[str, int]]  # each vCPU's HMP ``info registers``, read through QMP
    dump: Path
    ram_before: dict[int, str]
    ram_after: dict[int, str]


def as_registers(context: np.void) -> dict[str, int]:
    """A CONTEXT's registers in CpuState names."""
    registers = {name: int(context[name.capitalize()]) for name in (*GPRS, "rip")}
    registers.update({name: int(context[f"Seg{name.capitalize()}"]) for name in SELECTORS})
    registers.update({f"dr{n}": int(context[f"Dr{n}"]) for n in (0, 1, 2, 3, 6, 7)})
    registers.update(rflags=int(context["EFlags"]), mxcsr=int(context["MxCsr"]))
    xmm = context["FltSave"]["XmmRegisters"]
    registers.update({f"xmm{i}": int(x["Low"]) | int(x["High"]) << 64 for i, x in enumerate(xmm)})
    return registers


def pick(registers: dict[str, int], names) -> dict[str, int]:
    return {name: registers[name] for name in names}


def check_processor_contexts(dump: Path, model, shown: list[dict[str, int]]) -> None:
    """Every processor's CONTEXT holds the model's and HMP's registers of the vCPU running it."""
    with DumpFile(dump) as opened:
        assert int(opened.header["NumberProcessors"]) == model.cpu_count
        contexts = processor_contexts(opened)
    for number, context in enumerate(contexts):
        vcpu = model.processor_order[number]
        what = f"processor {number} (vCPU {vcpu})"
        ours = as_registers(context)
        assert int(context["ContextFlags"]) == CONTEXT_ALL_AMD64, what
        assert int(context["FltSave"]["MxCsr"]) == ours["mxcsr"], what
        assert pick(ours, LOADED) == pick(model.cpu_states[vcpu].registers, LOADED), what
        assert pick(ours, SHOWN) == pick(shown[vcpu], SHOWN), what


@pytest.fixture(scope="session")
def live_dumps() -> dict[str, LiveDump]:
    """Each variant's live dump, made on first use and shared by this module's tests."""
    return {}


@pytest.fixture(params=CONTEXT_VARIANTS, ids=lambda v: v.name)
def live(request, booted_once, live_dumps, run_windump, tmp_path_factory) -> LiveDump:
    """``windump save gdb://...?keep-stopped`` of the stopped guest, RAM hashed before and after."""
    variant = request.param
    if variant.name not in live_dumps:
        booted = booted_once(variant)
        port = booted.qemu.gdb_port
        shown = booted.qemu.registers()
        before = booted.qemu.ram_digests(booted.model.ram)
        dump = tmp_path_factory.mktemp("live") / "live.dmp"
        result = run_windump("save", "--quiet", f"gdb://127.0.0.1:{port}?keep-stopped", str(dump), timeout=300)
        assert result.returncode == 0 and dump.exists(), result.stderr
        assert "warning" not in result.stderr, result.stderr
        live_dumps[variant.name] = LiveDump(booted, shown, dump, before, booted.qemu.ram_digests(booted.model.ram))
    return live_dumps[variant.name]


def test_every_processor_context_holds_its_vcpus_registers(live):
    check_processor_contexts(live.dump, live.booted.model, live.shown)


def test_header_context_is_vcpu0_as_kdmp_parser_reads_it(live):
    result = kdmp_read(live.dump)
    assert result.parsed, result.reason
    ours = {name: result.context[name] for name in KDMP_CONTEXT_FIELDS}
    cpu0 = live.shown[0]
    expected = {name.capitalize(): cpu0[name] for name in (*GPRS, "rip")}
    expected.update({f"Seg{name.capitalize()}": cpu0[name] for name in SELECTORS})
    expected.update({f"Dr{n}": cpu0[f"dr{n}"] for n in (0, 1, 2, 3, 6, 7)})
    expected.update(ContextFlags=CONTEXT_ALL_AMD64, EFlags=cpu0["rflags"], MxCsr=cpu0["mxcsr"], MxCsr2=cpu0["mxcsr"])
    assert ours == expected


def test_guest_ram_is_unchanged_by_the_dump(live):
    assert live.ram_before.keys() == live.ram_after.keys()
    changed = [f"{address:#x}" for address, digest in live.ram_before.items() if live.ram_after[address] != digest]
    assert not changed, f"guest RAM changed in the MiB at {', '.join(changed)}"
    assert live.booted.qemu.execute("query-status")["status"] == "paused"


@pytest.mark.gdb
def test_windump_save_in_gdb_writes_debug_registers(booted_once, tmp_path):
    """Inside gdb, the registers come from gdb's frames and the debug registers from gdb's
    ``monitor``: they still land in each processor's CONTEXT."""
    guest = booted_once(CONTEXT_VARIANTS[-1])  # four vCPUs, KiProcessorBlock reordered
    shown = guest.qemu.registers()
    dump = tmp_path / "gdb.dmp"
    try:
        result = gdb(guest.qemu.gdb_port, f"windump-save --quiet {dump}")
    finally:
        guest.qemu.execute("stop")  # gdb -batch detaches at exit, resuming the guest
    assert result.returncode == 0 and dump.exists(), result.stdout + result.stderr
    assert "windump-save: warning" not in result.stdout + result.stderr
    check_processor_contexts(dump, guest.model, shown)
