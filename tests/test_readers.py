"""Third-party readers judge our output: kdmp-parser, volatility3 and memprocfs open the dump
``windump save`` writes from a QEMU-style ELF of the model guest and see the ELF's bytes (read with
pyelftools) at every address that matters, through physical addresses and through the guest's page
tables.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest

from elfmaker import write_qemu_elf
from gate import require
from readers import MEMPROCFS_MIN_SIZE, PAGE_MASK, PAGE_SIZE, READERS, Result, elf_physical_read, judges
from windump_plugins.guest import model as guestmodel
from windump_plugins.formats.context import CONTEXT, CONTEXT_CONTROL, CONTEXT_INTEGER, CONTEXT_SEGMENTS
from windump_plugins.dumpfile import DumpFile
from windump_plugins.formats.dumpheader import DUMP_TYPE_FULL, LIVE_SYSTEM_DUMP, PAGE_SHIFT, X64
from windump_plugins.guest.model import CrashedGuest

#: Variants of the model guest, each written, saved and read once.
VARIANTS = {
    "1cpu": {"cpus": 1},
    "2cpus": {"cpus": 2},
    "4cpus-encoded-kdbg-reordered": {"cpus": 4, "encoded_kdbg": True, "processor_order": (2, 0, 3, 1)},
    "bugcheck0": {"cpus": 2, "bugcheck_code": 0},
}

RANDOM_PAGES = 32
SEED = 20240601

#: The package each reader comes from, for the gate.
READER_PACKAGES = {"kdmp": "kdmp-parser", "volatility": "volatility3", "memprocfs": "memprocfs"}


@dataclass
class Judged:
    """One variant: the model, its ELF and dump, the addresses asked for and what each reader said."""

    guest: CrashedGuest
    elf: str
    dump: str
    physical: dict[int, str]  # page address -> what it is, for messages
    virtual: dict[int, str]
    results: dict[str, Result]


def _physical_pages(guest: CrashedGuest) -> dict[int, str]:
    """The pages both readers must serve: run ends, KDBG, KPRCBs, CONTEXTs and seeded random pages."""
    pages: dict[int, str] = {}
    runs = guest.windows_runs()
    for i, (base, count) in enumerate(runs.tolist()):
        pages[base << PAGE_SHIFT] = f"first page of run {i}"
        pages[(base + count - 1) << PAGE_SHIFT] = f"last page of run {i}"
    kdbg = guest.virtual_to_physical(guest.decoded_kdbg_address)
    pages[kdbg & PAGE_MASK] = "KDBG"
    pages[(kdbg + guestmodel.KDBG_SIZE - 1) & PAGE_MASK] = "KDBG end"
    for i, (prcb, context) in enumerate(zip(guest.kprcb_addresses, guest.context_addresses)):
        pages[guest.virtual_to_physical(prcb) & PAGE_MASK] = f"KPRCB {i}"
        pages[guest.virtual_to_physical(context) & PAGE_MASK] = f"CONTEXT {i}"
        pages[guest.virtual_to_physical(context + CONTEXT.itemsize - 1) & PAGE_MASK] = f"CONTEXT {i} end"
    pfns = np.concatenate([np.arange(base, base + count, dtype=np.uint64) for base, count in runs.tolist()])
    for pfn in np.random.default_rng(SEED).choice(pfns, RANDOM_PAGES, replace=False).tolist():
        pages.setdefault(pfn << PAGE_SHIFT, f"random page {pfn:#x}")
    return pages


def _in_runs(guest: CrashedGuest, physical: int) -> bool:
    return any(base <= physical >> PAGE_SHIFT < base + count for base, count in guest.windows_runs().tolist())


def _large_page_address(guest: CrashedGuest, page_size: int) -> int:
    """A kernel virtual address inside a ``page_size`` mapping whose physical page the dump holds.

    Kernel half only: memprocfs does not translate the model's supervisor-only identity map at 0
    (no Windows kernel maps the user half so)."""
    for mapping in guest.mappings:
        if mapping.page_size != page_size or mapping.virtual < 1 << 63:
            continue
        for base, count in guest.windows_runs().tolist():
            start = max(base << PAGE_SHIFT, mapping.physical)
            if start < min((base + count) << PAGE_SHIFT, mapping.physical + mapping.size):
                return mapping.virtual + start - mapping.physical + 0x123  # an offset within the page
    raise AssertionError(f"the model maps no dumped memory with {page_size:#x}-byte pages")


def _virtual_addresses(guest: CrashedGuest) -> dict[int, str]:
    addresses = {guest.decoded_kdbg_address: "KDBG", guestmodel.KUSER_SHARED_DATA: "KUSER_SHARED_DATA"}
    for i, prcb in enumerate(guest.kprcb_addresses):
        addresses[prcb] = f"KPRCB {i}"
    addresses[_large_page_address(guest, 2 << 20)] = "2 MiB page"
    addresses[_large_page_address(guest, 1 << 30)] = "1 GiB page"
    return addresses


def _judge(variant: str, directory) -> Judged:
    """Write the variant's ELF, save it with the CLI and ask every reader about it."""
    guest = CrashedGuest(**VARIANTS[variant])
    elf, dump = str(directory / "guest.elf"), str(directory / "guest.dmp")
    write_qemu_elf(elf, guest)
    environ = {key: value for key, value in os.environ.items() if not key.startswith("WINDUMP_")}
    environ["WINDUMP_PLUGINS"] = "elf"
    saved = subprocess.run([sys.executable, "-m", "windump_plugins", "save", "--quiet", elf, dump],
                           env=environ, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert saved.returncode == 0, saved.stderr
    physical, virtual = _physical_pages(guest), _virtual_addresses(guest)
    assert os.path.getsize(dump) >= MEMPROCFS_MIN_SIZE, "every judge must see this dump: make the model larger"
    results = {name: read(dump, list(physical), list(virtual)) for name, read in judges(dump).items()}
    return Judged(guest, elf, dump, physical, virtual, results)


@pytest.fixture(scope="module")
def judgements(tmp_path_factory) -> dict[str, Judged]:
    """Every variant judged once; the variants run side by side, their readers being subprocesses."""
    with ThreadPoolExecutor(len(VARIANTS)) as pool:
        futures = {variant: pool.submit(_judge, variant, tmp_path_factory.mktemp(variant)) for variant in VARIANTS}
        return {variant: future.result() for variant, future in futures.items()}


@pytest.fixture(params=list(VARIANTS))
def judged(request, judgements) -> Judged:
    return judgements[request.param]


@pytest.fixture(params=list(READERS))
def reader(request) -> str:
    """Each judge, skipped (failed under CI) where its package is missing."""
    require(READER_PACKAGES[request.param])
    return request.param


def test_reader_opens_the_dump(judged, reader):
    result = judged.results[reader]
    assert result.parsed, result.reason
    if reader != "memprocfs":  # it does not say
        assert result.dump_type == DUMP_TYPE_FULL
    assert result.directory_table_base == judged.guest.directory_table_base


def test_memprocfs_reads_the_header_and_finds_each_run_in_the_body(judged):
    """memprocfs's device layer takes KDBG's address and the processor count from the header, and
    finds run i's pages right after those of runs 0..i-1, from the end of the 0x2000-byte header."""
    require("memprocfs")
    result = judged.results["memprocfs"]
    assert result.parsed, result.reason
    with DumpFile(judged.dump) as dump:
        assert result.kdbg_address == int(dump.header["KdDebuggerDataBlock"]) == judged.guest.decoded_kdbg_address
        assert result.processors == int(dump.header["NumberProcessors"]) == len(judged.guest.cpu_states)
    expected, offset = [], X64.size
    for base, count in judged.guest.windows_runs().tolist():
        expected.append([base << PAGE_SHIFT, count << PAGE_SHIFT, offset])
        offset += count << PAGE_SHIFT
    assert result.memory_map == expected


def _context_bytes(guest: CrashedGuest) -> dict[int, int]:
    """Physical address -> vCPU of every byte of the model's processor CONTEXTs (the bytes windump
    overlays with the vCPUs' registers)."""
    owners = {}
    for vcpu, address in enumerate(guest.context_addresses):
        for offset in range(CONTEXT.itemsize):
            owners[guest.virtual_to_physical(address + offset)] = vcpu
    return owners


def test_reader_sees_the_elf_bytes_at_physical_pages(judged, reader):
    """Every page holds the ELF's bytes, outside the processor CONTEXTs windump fills in."""
    result = judged.results[reader]
    assert result.parsed, result.reason
    overlaid = _context_bytes(judged.guest)
    wrong = []
    for page, what in judged.physical.items():
        data = result.physical.get(page)
        if data is None:
            wrong.append(f"{what} ({page:#x}): {reader} has no such page ({result.errors.get(page, 'no reason')})")
            continue
        keep = np.array([page + i not in overlaid for i in range(PAGE_SIZE)])
        elf = np.frombuffer(elf_physical_read(judged.elf, page, PAGE_SIZE), dtype=np.uint8)
        if (np.frombuffer(data, dtype=np.uint8)[keep] != elf[keep]).any():
            wrong.append(f"{what} ({page:#x}): {reader} reads other bytes than the ELF holds")
    assert not wrong, "\n".join(wrong)


#: What a CONTEXT built from QEMU's ELF CPU notes holds: no debug, x87 or SSE state.
ELF_CONTEXT_FLAGS = CONTEXT_CONTROL | CONTEXT_INTEGER | CONTEXT_SEGMENTS
ELF_CONTEXT_REGISTERS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
                         "r13", "r14", "r15", "rip")


def _expected_context(registers: dict[str, int]) -> dict[str, int]:
    """The CONTEXT fields (winnt.h names) a vCPU's ELF registers must give."""
    expected = {name.capitalize(): registers.get(name, 0) for name in ELF_CONTEXT_REGISTERS}
    expected.update({f"Seg{name.capitalize()}": registers[name] for name in ("cs", "ds", "es", "fs", "gs", "ss")})
    expected.update(ContextFlags=ELF_CONTEXT_FLAGS, EFlags=registers["rflags"], MxCsr=0)
    return expected


def test_reader_sees_each_vcpus_registers_in_its_processors_context(judged, reader):
    """The CONTEXT each KPRCB points at holds the registers of the vCPU whose KPCR holds that KPRCB,
    whatever KiProcessorBlock's order."""
    result = judged.results[reader]
    assert result.parsed, result.reason
    guest = judged.guest
    for vcpu, address in enumerate(guest.context_addresses):
        raw = bytearray()
        for offset in range(0, CONTEXT.itemsize, 8):
            physical = guest.virtual_to_physical(address + offset)
            raw += result.physical[physical & PAGE_MASK][physical & ~PAGE_MASK:][:8]
        context = np.frombuffer(bytes(raw[:CONTEXT.itemsize]), dtype=CONTEXT)[0]
        expected = _expected_context(guest.cpu_states[vcpu].registers)
        assert {name: int(context[name]) for name in expected} == expected, f"vCPU {vcpu}"


def test_reader_translates_as_the_guest_page_tables(judged, reader):
    result = judged.results[reader]
    assert result.parsed, result.reason
    wrong = []
    for va, what in judged.virtual.items():
        expected = judged.guest.virtual_to_physical(va)
        assert _in_runs(judged.guest, expected), f"{what} ({va:#x}) is not in the dump: choose another address"
        translated = result.translations.get(va)
        if translated != expected:
            shown = "nothing" if translated is None else f"{translated:#x}"
            wrong.append(f"{what} ({va:#x}): {reader} translates to {shown}, the page tables to {expected:#x}"
                         f" {result.errors.get(va, '')}")
        elif result.virtual.get(va) != elf_physical_read(judged.elf, expected & PAGE_MASK, PAGE_SIZE):
            wrong.append(f"{what} ({va:#x}): {reader} reads other bytes there than the ELF holds")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("reader", ["kdmp", "volatility"], indirect=True)  # memprocfs does not show it
def test_reader_sees_the_bug_check(judged, reader):
    """The bug-check code and parameters the guest recorded in KiBugcheckData, 0x161 for no code."""
    result = judged.results[reader]
    assert result.parsed, result.reason
    guest = judged.guest
    recorded = np.frombuffer(guest.read(guest.virtual_to_physical(guest.ki_bugcheck_data), 40), dtype="<u8").tolist()
    assert result.bugcheck == [recorded[0] or LIVE_SYSTEM_DUMP, *recorded[1:]]


def test_kdmp_context_is_the_header_context(judged):
    """kdmp-parser takes its CONTEXT from the header's ContextRecord, which windump fills from vCPU 0."""
    result = judged.results["kdmp"]
    assert result.parsed, result.reason
    expected = _expected_context(judged.guest.cpu_states[0].registers)
    assert {name: result.context[name] for name in expected} == expected
    assert result.context["MxCsr2"] == 0


def test_judges_notice_a_damaged_dump(judgements, reader, tmp_path):
    """A changed byte and a truncated tail do not get past the comparison with the ELF (and a
    truncated file does not take the test run down, whatever the reader does with it)."""
    judged = judgements["1cpu"]
    runs = judged.guest.windows_runs().tolist()
    changed, lost = runs[0][0] << PAGE_SHIFT, (runs[-1][0] + runs[-1][1] - 1) << PAGE_SHIFT
    damaged = tmp_path / "damaged.dmp"
    with open(judged.dump, "rb") as original, open(damaged, "wb") as copy:
        data = bytearray(original.read())
        data[0x2000 + 0x10] ^= 0xFF  # a byte of the first run's first page
        copy.write(data[:-PAGE_SIZE])  # without the last run's last page
    result = READERS[reader](damaged, [changed, lost])
    for page in (changed, lost):
        assert not result.parsed or result.physical.get(page) != elf_physical_read(judged.elf, page, PAGE_SIZE)
