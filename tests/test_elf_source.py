"""The ``elf`` source against QEMU-style ELF files from tests/elfmaker.py, pyelftools and a real QEMU."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile

from gate import require
from elfmaker import BIOS_BASE, BIOS_SIZE, EM_386, TinyGuest, bios_rom, note, write_qemu_elf
from windump_plugins.formats.elfnotes import PRSTATUS_I386, PRSTATUS_X86_64, QEMU_CPU_SEGMENT, QEMU_CPU_STATE
from windump_plugins.errors import SourceError
from windump_plugins.guest.model import CrashedGuest
from windump_plugins.source import CpuState
from windump_plugins.sources import elf
from windump_plugins.formats.elf import ELF32_EHDR, ELF32_PHDR, ELF32_SHDR, ELF64_EHDR, ELF64_PHDR, ELF64_SHDR
from windump_plugins.elffile import ElfSource

LOW_RANGES = [(0, 0xA0000), (0x100000, 0x180000)]
HIGH_RANGE = (0x100000000, 0x100030000)

#: Every register QEMUCPUState gives, with distinct values (64-bit ones above 4 GiB).
QEMU_REGISTERS = {
    **{name: 0xFFFF800000000000 + 0x1111 * (i + 1) for i, name in enumerate(
        ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))},
    "rip": 0xFFFFF80312345678, "rflags": 0x10246,
    "cs": 0x10, "ds": 0x2B, "es": 0x2B, "fs": 0x53, "gs": 0x2B, "ss": 0x18,
    "fs_base": 0x7FF6000000, "gs_base": 0xFFFFF80000B9C000,
    "cr0": 0x80050033, "cr2": 0x1234000, "cr3": 0x1AD002, "cr4": 0x350EF8, "kernel_gs_base": 0xE9D7B000,
}
PRSTATUS_NAMES = set(QEMU_REGISTERS) - {"cr0", "cr2", "cr3", "cr4", "kernel_gs_base"}
SELECTORS = {"cs", "ds", "es", "fs", "gs", "ss"}
I386_PRSTATUS_NAMES = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip", "rflags"} | SELECTORS


def vmcoreinfo_record(fill: int = 0x5A) -> bytes:
    """A Windows guest's published note: VMCOREINFO header, then a 0x2000-byte dump header."""
    return note(b"VMCOREINFO", 0, b"PAGEDU64" + bytes([fill]) * (0x2000 - 8))


def cpus(count: int = 2) -> list[CpuState]:
    return [CpuState(i, {name: value + i for name, value in QEMU_REGISTERS.items()}) for i in range(count)]


def merged(ranges: list[tuple[int, int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and out[-1][1] == start:
            out[-1][1] = end
        else:
            out.append([start, end])
    return out


def test_layout_offsets_match_qemu_arch_dump():
    """Pinned from target/i386/arch_dump.c and the ELF specification."""
    assert QEMU_CPU_STATE.itemsize == 0x1B8 and QEMU_CPU_SEGMENT.itemsize == 24
    assert {name: QEMU_CPU_STATE.fields[name][1] for name in ("size", "rax", "rsp", "r8", "r15", "rip", "rflags", "cs",
                                                             "ds", "gs", "ss", "ldt", "tr", "gdt", "idt", "cr",
                                                             "kernel_gs_base")} == {
        "size": 4, "rax": 0x08, "rsp": 0x38, "r8": 0x48, "r15": 0x80, "rip": 0x88, "rflags": 0x90, "cs": 0x98,
        "ds": 0xB0, "gs": 0xF8, "ss": 0x110, "ldt": 0x128, "tr": 0x140, "gdt": 0x158, "idt": 0x170, "cr": 0x188,
        "kernel_gs_base": 0x1B0}
    assert QEMU_CPU_SEGMENT.fields["base"][1] == 16
    assert PRSTATUS_X86_64.itemsize == 336
    names = ("pr_pid", "r15", "rax", "rip", "cs", "rflags", "rsp", "fs_base", "gs")
    assert [PRSTATUS_X86_64.fields[n][1] for n in names] == [32, 112, 192, 240, 248, 256, 264, 280, 320]
    assert PRSTATUS_I386.itemsize == 144
    names = ("pr_pid", "rbx", "rax", "ds", "gs", "rip", "cs", "rflags", "rsp", "ss")
    assert [PRSTATUS_I386.fields[n][1] for n in names] == [24, 72, 96, 100, 112, 120, 124, 128, 132, 136]
    assert (ELF64_EHDR.itemsize, ELF64_PHDR.itemsize, ELF64_SHDR.itemsize) == (64, 56, 64)
    assert (ELF32_EHDR.itemsize, ELF32_PHDR.itemsize, ELF32_SHDR.itemsize) == (52, 32, 40)
    assert [ELF64_EHDR.fields[n][1] for n in ("e_machine", "e_phoff", "e_shoff", "e_phentsize", "e_phnum")] \
        == [0x12, 0x20, 0x28, 0x36, 0x38]
    assert [ELF32_EHDR.fields[n][1] for n in ("e_machine", "e_phoff", "e_shoff", "e_phentsize", "e_phnum")] \
        == [0x12, 0x1C, 0x20, 0x2A, 0x2C]
    assert [ELF64_PHDR.fields[n][1] for n in ("p_offset", "p_paddr", "p_filesz")] == [0x08, 0x18, 0x20]
    assert [ELF32_PHDR.fields[n][1] for n in ("p_offset", "p_paddr", "p_filesz")] == [0x04, 0x0C, 0x10]
    assert (ELF64_SHDR.fields["sh_info"][1], ELF32_SHDR.fields["sh_info"][1]) == (0x2C, 0x1C)


@pytest.mark.parametrize("elf_class", [64, 32])
@pytest.mark.parametrize("pn_xnum", [False, True])
@pytest.mark.parametrize("quirks", [True, False])
def test_round_trip(tmp_path, elf_class, pn_xnum, quirks):
    ranges = LOW_RANGES + ([HIGH_RANGE] if elf_class == 64 else [])
    guest = TinyGuest(ranges, cpus=cpus(), note=vmcoreinfo_record())
    path = tmp_path / "guest.elf"
    # One RAM range split into two PT_LOADs at an unaligned address: reads must cross the seam.
    pieces = [LOW_RANGES[0], (0x100000, 0x123457), (0x123457, 0x180000)] + ranges[2:]
    write_qemu_elf(path, guest, elf_class=elf_class, pn_xnum=pn_xnum, qemu72_quirks=quirks, ranges=pieces)

    with open(path, "rb") as f:  # an independent parser agrees on the layout
        reference = ELFFile(f)
        assert reference.elfclass == elf_class
        assert reference.header["e_ehsize"] == (8 if quirks else reference.structs.Elf_Ehdr.sizeof())
        assert reference.header["e_phnum"] == (0xFFFF if pn_xnum else len(pieces) + 1 + quirks)
        loads = [s.header for s in reference.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert [s["p_paddr"] for s in loads] == sorted([p[0] for p in pieces] + ([BIOS_BASE] if quirks else []))
        assert (loads[0]["p_offset"] % 0x1000 != 0) == quirks  # QEMU 7.2 puts RAM right after the notes
        segment_bytes = {s["p_paddr"]: seg.data() for seg in reference.iter_segments()
                         if (s := seg.header)["p_type"] == "PT_LOAD"}
    assert (stat.S_IMODE(os.stat(path).st_mode) == 0o400) == quirks  # ElfSource opens it read-only

    with ElfSource(path) as source:
        expected = merged(ranges + ([(BIOS_BASE, BIOS_BASE + BIOS_SIZE)] if quirks else []))
        assert source.ram.tolist() == expected and source.ram.dtype == np.uint64
        assert source.description == str(path)
        for start, end in ranges:
            assert source.read(start, end - start) == guest.read(start, end - start)
        for paddr, data in segment_bytes.items():
            assert source.read(paddr, len(data)) == data
        assert source.read(0x123000, 0x1000) == guest.read(0x123000, 0x1000)
        if quirks:
            assert source.read(BIOS_BASE, BIOS_SIZE) == bios_rom()
            assert source.read(0xFFFFFFF0, 1) == b"\xea"
        assert source.vmcoreinfo() == vmcoreinfo_record()
        assert [c.registers for c in source.cpus()] == [c.registers for c in cpus()]
        assert [c.index for c in source.cpus()] == [0, 1]


def test_model_guest_round_trip(tmp_path):
    guest = CrashedGuest(cpus=3)
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, guest)
    with ElfSource(path) as source:
        bios = (BIOS_BASE, BIOS_BASE + BIOS_SIZE)
        assert source.ram.tolist() == merged([tuple(r) for r in guest.ram.tolist()] + [bios])
        for start, end in guest.ram.tolist():
            assert source.read(start, end - start) == guest.read(start, end - start)
        assert source.vmcoreinfo() == guest.note
        # an ELF carries no debug, x87 or SSE registers: the rest must survive as the model set them
        assert [c.registers for c in source.cpus()] == [
            {name: c.registers.get(name, 0) for name in QEMU_REGISTERS} for c in guest.cpu_states]


def test_file_extents_agree_with_read(tmp_path):
    guest = TinyGuest(LOW_RANGES)
    path = tmp_path / "guest.elf"
    # The two halves of a RAM range written in swapped order: a seam that is not contiguous in the file.
    write_qemu_elf(path, guest, qemu72_quirks=False,
                   ranges=[LOW_RANGES[0], (0x140001, 0x180000), (0x100000, 0x140001)])
    with ElfSource(path) as source:
        extents = source.file_extents(0x13F000, 0x3000)
        assert [e.length for e in extents] == [0x1001, 0x1FFF]
        fd = extents[0].file.fileno()
        assert b"".join(os.pread(fd, e.length, e.offset) for e in extents) == source.read(0x13F000, 0x3000)
        assert source.read(0x13F000, 0x3000) == guest.read(0x13F000, 0x3000)
        buffer = np.zeros(0x400, np.uint32)  # readinto takes any writable buffer
        source.readinto(0x100000, memoryview(buffer))
        assert buffer.tobytes() == guest.read(0x100000, 0x1000)


def test_reads_outside_ram_name_the_range(tmp_path):
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, TinyGuest(LOW_RANGES), qemu72_quirks=False)
    with ElfSource(path) as source:
        for address, length in [(0x9F000, 0x2000), (0xA0000, 0x1000), (0x180000, 1)]:
            with pytest.raises(SourceError) as error:
                source.read(address, length)
            assert str(error.value) == f"{path}: physical range {address:#x}-{address + length:#x} is not in guest RAM"
        with pytest.raises(SourceError):
            source.file_extents(0x9F000, 0x2000)


def test_paging_style_aliases_are_accepted(tmp_path):
    """paging=true dumps map physical blocks again through PT_LOADs that share the file bytes."""
    guest = TinyGuest(LOW_RANGES)
    path = tmp_path / "guest.elf"
    aliases = [(0x100000, 0x80000), (0x100000, 0x80000), (0x123000, 0x1000), (0x17F000, 0x1000), (0x1000, 0x3456)]
    loads = write_qemu_elf(path, guest, qemu72_quirks=False, extra_loads=aliases)
    assert len(loads) == 2 + len(aliases)
    with ElfSource(path) as source:
        assert source.ram.tolist() == [list(r) for r in LOW_RANGES]
        for start, end in LOW_RANGES:
            assert source.read(start, end - start) == guest.read(start, end - start)


def test_cpu_registers_without_qemu_notes_come_from_prstatus(tmp_path):
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, TinyGuest(LOW_RANGES), cpus=cpus(3), qemu72_quirks=False)
    data = bytearray(path.read_bytes())
    assert data.count(b"QEMU\0\0\0\0") == 3
    path.write_bytes(data.replace(b"QEMU\0\0\0\0", b"XEMU\0\0\0\0"))  # notes of no known owner
    with ElfSource(path) as source:
        assert [c.registers for c in source.cpus()] == [
            {name: c.registers[name] for name in PRSTATUS_NAMES} for c in cpus(3)]


def test_i386_prstatus_and_qemu_note_preferred(tmp_path):
    """QEMU writes the i386 prstatus when the CPU is not in long mode (even in an ELF64 file)."""
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, TinyGuest(LOW_RANGES), cpus=cpus(1), machine=EM_386)
    with ElfSource(path) as source:  # the QEMU note keeps what the 32-bit prstatus truncates
        assert source.cpus()[0].registers == cpus(1)[0].registers
    data = bytearray(path.read_bytes())
    path.chmod(0o600)
    path.write_bytes(data.replace(b"QEMU\0\0\0\0", b"XEMU\0\0\0\0"))
    with ElfSource(path) as source:
        registers = source.cpus()[0].registers
    expected = {name: cpus(1)[0].registers[name] & (0xFFFF if name in SELECTORS else 0xFFFFFFFF)
                for name in I386_PRSTATUS_NAMES}
    assert registers == expected


def test_qemu_cpu_state_without_kernel_gs_base(tmp_path):
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, TinyGuest(LOW_RANGES), cpus=cpus(1), cpu_state_size=0x1B0)
    with ElfSource(path) as source:
        registers = source.cpus()[0].registers
    assert "kernel_gs_base" not in registers
    assert registers == {k: v for k, v in cpus(1)[0].registers.items() if k != "kernel_gs_base"}


def test_vmcoreinfo_note_round_trips_with_its_header(tmp_path):
    path = tmp_path / "guest.elf"
    record = vmcoreinfo_record(0x33)
    write_qemu_elf(path, TinyGuest(LOW_RANGES), cpus=cpus(2), vmcoreinfo=record)
    with ElfSource(path) as source:
        published = source.vmcoreinfo()
    assert published == record and len(published) == 24 + 0x2000
    assert struct.unpack_from("<III", published) == (11, 0x2000, 0) and published[12:24] == b"VMCOREINFO\0\0"
    assert published[24:32] == b"PAGEDU64"

    write_qemu_elf(path, TinyGuest(LOW_RANGES), cpus=cpus(2), vmcoreinfo=b"")
    with ElfSource(path) as source:
        assert source.vmcoreinfo() is None and len(source.cpus()) == 2


def test_zero_chunks_are_written_sparse(tmp_path):
    guest = TinyGuest([(0x100000, 0x3100000)], zero=[(0x200000, 0x3000000)])
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, guest, qemu72_quirks=False, chunk_size=1 << 20)
    assert os.stat(path).st_blocks * 512 < os.stat(path).st_size - (32 << 20)
    with ElfSource(path) as source:
        assert source.read(0x100000, 0x3000000) == guest.read(0x100000, 0x3000000)


def test_hooks_claim_only_elf_files(tmp_path):
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, TinyGuest(LOW_RANGES))
    source = elf.windump_open_file(path=str(path), head=path.read_bytes()[:4096])
    assert isinstance(source, ElfSource)
    source.close()
    assert source._file.closed
    assert elf.windump_open_file(path=str(path), head=b"PAGEDU64") is None
    assert elf.windump_open_file(path=str(path), head=b"") is None
    assert [kind.pattern for kind in elf.windump_source_kinds()] == ["FILE.elf"]


# --- a real QEMU -------------------------------------------------------------------------------------


def qmp_dump(tmp_path, paging: bool) -> str:
    """Dump a stopped ``pc`` VM of 64 MiB and 2 vCPUs with QEMU itself; return the ELF's path."""
    require("qemu-system-x86_64")
    socket_path, dump = str(tmp_path / "qmp.sock"), str(tmp_path / "qemu.elf")
    qemu = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc", "-m", "64M", "-smp", "2", "-S", "-nodefaults",
                             "-display", "none", "-qmp", f"unix:{socket_path},server=on,wait=off"])
    try:
        deadline = time.monotonic() + 10
        while True:  # the socket file appears at bind(), before QEMU listens
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        with sock, sock.makefile("rw") as stream:

            def execute(command, **arguments):
                stream.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
                stream.flush()
                while "return" not in (reply := json.loads(stream.readline())):
                    assert "error" not in reply, reply
                return reply["return"]

            stream.readline()  # greeting
            execute("qmp_capabilities")
            execute("dump-guest-memory", paging=paging, protocol=f"file:{dump}")
            execute("quit")
        qemu.wait(10)
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    return dump


@pytest.mark.qemu
def test_real_qemu_dump(tmp_path):
    path = qmp_dump(tmp_path, paging=False)
    with open(path, "rb") as f:
        reference = ELFFile(f)
        loads = {s["p_paddr"]: s.data() for s in reference.iter_segments() if s["p_type"] == "PT_LOAD"}
        notes = [n for s in reference.iter_segments() if s["p_type"] == "PT_NOTE" for n in s.iter_notes()]
    with ElfSource(path) as source:
        # pc machine, 64 MiB: RAM from 0 (in QEMU's blocks), the BIOS ROM just below 4 GiB
        assert source.ram.tolist() == [[0, 64 << 20], [BIOS_BASE, 1 << 32]]
        for paddr, data in loads.items():
            assert source.read(paddr, len(data)) == data
        assert source.read(0xFFFFFFF0, 1) == b"\xea"  # SeaBIOS's reset vector: a far jump
        assert source.vmcoreinfo() is None
        states = [c.registers for c in source.cpus()]
    assert [n["n_name"] for n in notes] == ["CORE", "CORE", "QEMU", "QEMU"]
    assert len(states) == 2
    for registers in states:  # an x86 CPU at reset
        reset = (registers["rip"], registers["cs"], registers["rflags"], registers["cr0"])
        assert reset == (0xFFF0, 0xF000, 2, 0x60000010)
    # QEMU's CORE notes (i386 prstatus: the CPUs are not in long mode) agree with its QEMU notes
    copy = tmp_path / "core-only.elf"
    copy.write_bytes(Path(path).read_bytes().replace(b"QEMU\0\0\0\0", b"XEMU\0\0\0\0"))
    with ElfSource(copy) as source:
        from_prstatus = [c.registers for c in source.cpus()]
    assert from_prstatus == [{name: states[i][name] for name in I386_PRSTATUS_NAMES} for i in range(2)]


def test_adjacent_pt_loads_become_one_piece(tmp_path):
    # 65,538 PT_LOADs (PN_XNUM) of 16 bytes, back to back in memory and in the file, as QEMU writes a
    # RAM block it splits by memory region: one piece, so a save makes one kernel copy, not 65,538.
    count, size = 0x10002, 16
    guest = TinyGuest([(0, count * size)])
    path = tmp_path / "pieces.elf"
    loads = write_qemu_elf(path, guest, pn_xnum=True, qemu72_quirks=False,
                           ranges=[(i * size, (i + 1) * size) for i in range(count)])
    assert len(loads) == count
    with ElfSource(path) as source:
        assert source.ram.tolist() == [[0, count * size]]
        (extent,) = source.file_extents(0, count * size)
        assert (extent.offset, extent.length) == (loads[0][1], count * size)
        assert source.read(0, count * size) == guest.read(0, count * size)
        assert source.read(0x1234, 0x100) == guest.read(0x1234, 0x100)


def test_pt_loads_adjacent_in_memory_but_not_in_the_file_stay_apart(tmp_path):
    # Written in reverse order: physically contiguous, but the second block comes first in the file.
    guest = TinyGuest([(0, 0x3000)])
    path = tmp_path / "reversed.elf"
    write_qemu_elf(path, guest, qemu72_quirks=False, ranges=[(0x2000, 0x3000), (0x1000, 0x2000), (0, 0x1000)])
    with ElfSource(path) as source:
        assert source.ram.tolist() == [[0, 0x3000]]
        assert len(source.file_extents(0, 0x3000)) == 3
        assert source.read(0, 0x3000) == guest.read(0, 0x3000)
