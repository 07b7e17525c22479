"""Damaged ELF files: each must end in one WindumpError line naming the file and the damage."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elfmaker import TinyGuest, note, write_qemu_elf
from windump_plugins.errors import FormatError, SourceError, WindumpError
from windump_plugins.source import CpuState
from windump_plugins.elffile import ElfSource

RANGES = [(0, 0xA0000), (0x100000, 0x180000)]
CPUS = [CpuState(i, {"rip": 0xFFFFF80000001000 + i, "cs": 0x10, "cr3": 0x1AD000}) for i in range(2)]
VMCOREINFO = note(b"VMCOREINFO", 0, b"PAGEDU64" + bytes(0x2000 - 8))

# The layout elfmaker writes with QEMU 7.2's quirks: ELF header, 2 section headers at 0x40, then
# 4 program headers at 0xC0 (PT_NOTE; PT_LOADs 1, 2 for RAM and 3 for the BIOS ROM), then the notes:
# 2 CORE (356 bytes each), 2 QEMU (460 each) and VMCOREINFO (24 + 0x2000), 9848 bytes in all.
PHOFF, NOTES, NOTES_SIZE = 0xC0, 0x1A0, 9848
RAM0 = NOTES + NOTES_SIZE  # file offset of PT_LOAD 1


def phdr(index: int, field_offset: int) -> int:
    return PHOFF + 56 * index + field_offset


@pytest.fixture
def dump(tmp_path):
    path = tmp_path / "guest.elf"
    loads = write_qemu_elf(path, TinyGuest(RANGES), cpus=CPUS, vmcoreinfo=VMCOREINFO)
    assert loads[0][1] == RAM0
    path.chmod(0o600)
    return path


def patch(path, offset: int, fmt: str, value: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(data)


def truncate(path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def assert_fails(path, message: str, error: type = FormatError) -> None:
    with pytest.raises(WindumpError) as caught:
        ElfSource(path)
    assert type(caught.value) is error
    assert str(caught.value) == f"{path}: {message}"


CASES = {
    "empty": (lambda p: truncate(p, 0), "empty file, not a QEMU ELF dump"),
    "not elf": (lambda p: p.write_bytes(b"MZ\x90\0" + bytes(60)), "not an ELF file (no \\x7fELF magic)"),
    "ident cut": (lambda p: truncate(p, 10), "truncated in the ELF header (10 bytes)"),
    "header cut": (lambda p: truncate(p, 40), "truncated in the ELF header (40 of 64 bytes)"),
    "class": (lambda p: patch(p, 4, "B", 3), "ELF class 3 is neither ELFCLASS32 nor ELFCLASS64"),
    "big endian": (lambda p: patch(p, 5, "B", 2), "ELF data encoding 2 is not little endian (ELFDATA2LSB)"),
    "executable": (lambda p: patch(p, 0x10, "<H", 2), "ELF type 2 is not a core file (ET_CORE)"),
    "aarch64": (lambda p: patch(p, 0x12, "<H", 183), "ELF machine 183 is neither x86-64 (62) nor i386 (3)"),
    "phentsize": (lambda p: patch(p, 0x36, "<H", 32),
                  "e_phentsize 32 is not the 56 bytes of an ELFCLASS64 program header"),
    "program headers cut": (lambda p: truncate(p, 0x100),
                            "truncated in the program headers: needs file bytes 0xc0-0x1a0, the file has 0x100"),
    "notes cut": (lambda p: truncate(p, 0x1000),
                  f"truncated in PT_NOTE 0: needs file bytes 0x1a0-{RAM0:#x}, the file has 0x1000"),
    "ram cut": (lambda p: truncate(p, 0x50000),
                f"PT_LOAD 1 (physical 0x0-0xa0000) is truncated: it ends at file offset {RAM0 + 0xA0000:#x}, "
                "the file has 0x50000"),
    "no PT_LOAD": (lambda p: [patch(p, phdr(i, 0), "<I", 0) for i in (1, 2, 3)],
                   "no PT_LOAD segment with data: the ELF holds no guest memory"),
    "empty PT_LOADs": (lambda p: [patch(p, phdr(i, 0x20), "<Q", 0) for i in (1, 2, 3)],
                       "no PT_LOAD segment with data: the ELF holds no guest memory"),
    "huge note": (lambda p: patch(p, NOTES + 4, "<I", 0xFFFFFFF0),
                  f"PT_NOTE 0: note 0 claims a 5-byte name and a 4294967280-byte descriptor, past the end of "
                  f"its {NOTES_SIZE}-byte segment"),
    "huge PT_NOTE": (lambda p: patch(p, phdr(0, 0x20), "<Q", 1 << 40),
                     "PT_NOTE 0 claims 1099511627776 bytes of notes, more than any QEMU dump holds (16777216)"),
    "note header cut": (lambda p: patch(p, phdr(0, 0x20), "<Q", 2 * 356 + 8),
                        "PT_NOTE 0: truncated in the header of note 2 at segment offset 0x2c8"),
    "absurd phnum": (lambda p: (patch(p, 0x38, "<H", 0xFFFF), patch(p, 0x40 + 0x2C, "<I", 0xFFFFFFFF)),
                     "4294967295 program headers is absurd (a QEMU dump has at most 4194304)"),
    "PN_XNUM without sections": (lambda p: (patch(p, 0x38, "<H", 0xFFFF), patch(p, 0x28, "<Q", 0)),
                                 "e_phnum is PN_XNUM but there is no 64-byte section header 0 to hold the "
                                 "program header count"),
    "PN_XNUM section cut": (lambda p: (patch(p, 0x38, "<H", 0xFFFF), patch(p, 0x28, "<Q", 1 << 30)),
                            "truncated in section header 0 (the program header count under PN_XNUM): needs file "
                            f"bytes 0x40000000-0x40000040, the file has {RAM0 + 0x120000 + 0x40000 + 11:#x}"),
    "wraps": (lambda p: patch(p, phdr(2, 0x18), "<Q", 0xFFFFFFFFFFFF0000),
              "PT_LOAD 2 (physical 0xffffffffffff0000, 0x80000 bytes) runs past the end of the physical address space"),
    "QEMUCPUState version": (lambda p: patch(p, NOTES + 2 * 356 + 20, "<I", 2),
                             "QEMUCPUState version 2 is not the known version 1"),
}


@pytest.mark.parametrize("case", CASES)
def test_damage_is_one_clear_line(dump, case):
    damage, message = CASES[case]
    damage(dump)
    assert_fails(dump, message)


def test_short_qemu_cpu_state(tmp_path):
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, TinyGuest(RANGES), cpus=CPUS, cpu_state_size=0x100)
    assert_fails(path, "QEMU CPU state note of 256 bytes is shorter than QEMUCPUState (0x1b0 bytes)")


def test_prstatus_of_unknown_size(tmp_path):
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, TinyGuest(RANGES), cpus=[], vmcoreinfo=note(b"CORE", 1, bytes(100)))
    assert_fails(path, "CORE NT_PRSTATUS note of 100 bytes is neither the x86-64 (336) nor the i386 (144) prstatus")


def test_conflicting_aliases(tmp_path):
    path = tmp_path / "guest.elf"
    loads = write_qemu_elf(path, TinyGuest(RANGES), extra_loads=[(0x1000, 0x2000)])
    (_, ram0, _), (alias_paddr, alias_offset, _) = loads[0], loads[-1]
    assert alias_paddr == 0x1000 and alias_offset == ram0 + 0x1000
    path.chmod(0o600)
    patch(path, phdr(len(loads), 0x08), "<Q", alias_offset + 8)
    assert_fails(path, f"PT_LOAD {len(loads)} puts physical 0x1000-0x3000 at file offset {alias_offset + 8:#x}, "
                       f"but PT_LOAD 1 puts it at {alias_offset:#x}")


def test_elf32_damage(tmp_path):
    path = tmp_path / "guest.elf"
    write_qemu_elf(path, TinyGuest(RANGES), elf_class=32, pn_xnum=True)
    path.chmod(0o600)
    truncate(path, 40)
    assert_fails(path, "truncated in the ELF header (40 of 52 bytes)")
    write_qemu_elf(path, TinyGuest(RANGES), elf_class=32, pn_xnum=True)
    path.chmod(0o600)
    patch(path, 52 + 0x1C, "<I", 5_000_000)  # section 0's sh_info, just after the 52-byte ELF32 header
    assert_fails(path, "5000000 program headers is absurd (a QEMU dump has at most 4194304)")


def test_missing_file(tmp_path):
    assert_fails(tmp_path / "absent.elf", "cannot open: No such file or directory", SourceError)


def test_file_truncated_while_open(dump):
    with ElfSource(dump) as source:
        truncate(dump, RAM0 + 0x1000)
        with pytest.raises(SourceError) as caught:
            source.read(0x800, 0x1000)
    assert str(caught.value) == (f"{dump}: the file ended at offset {RAM0 + 0x1000:#x} while reading physical "
                                 "0x800-0x1800 (was it truncated?)")


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory) -> dict[tuple[bool, int], bytes]:
    """Small valid ELFs, with and without QEMU 7.2's quirks, 64- and 32-bit."""
    bases = {}
    for quirks in (True, False):
        for elf_class in (64, 32):
            path = tmp_path_factory.mktemp("base") / "guest.elf"
            write_qemu_elf(path, TinyGuest([(0, 0x3000), (0x5000, 0x6000)]), cpus=CPUS[:1], vmcoreinfo=VMCOREINFO,
                           qemu72_quirks=quirks, elf_class=elf_class)
            bases[quirks, elf_class] = path.read_bytes()
    return bases


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_never_escapes_as_another_exception(tmp_path, fuzz_bases, data):
    damaged = bytearray(fuzz_bases[data.draw(st.booleans()), data.draw(st.sampled_from([32, 64]))])
    for _ in range(data.draw(st.integers(1, 8))):
        damaged[data.draw(st.integers(0, 0x600))] = data.draw(st.integers(0, 255))
    path = tmp_path / "damaged.elf"
    path.write_bytes(bytes(damaged[:data.draw(st.integers(0, len(damaged)))]))
    try:
        with ElfSource(path) as source:
            for start, end in source.ram.tolist():
                source.read(start, min(end - start, 0x2000))
            source.cpus()
    except WindumpError as error:
        assert "\n" not in str(error) and str(error).startswith(f"{path}: ")
