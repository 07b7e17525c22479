"""Write guest memory as a QEMU ``dump-guest-memory`` ELF, the way QEMU does: the test suite's way to
turn a model guest into the file the ``elf`` source reads.

The layout follows QEMU's ``dump/dump.c`` and ``target/i386/arch_dump.c``, encoded here with
``struct`` from the C declarations, independently of the parser's numpy layouts, so a round trip
checks both. With ``qemu72_quirks`` the file also has what Debian's QEMU 7.2 writes (``e_ehsize`` 8,
a null and a ``.shstrtab`` section header before the program headers, PT_LOADs at unaligned offsets,
a BIOS ROM block at 0xfffc0000, mode 0400).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable, Sequence

import numpy as np

from windump_plugins.source import CpuState

EM_386, EM_X86_64 = 3, 62
ET_CORE, PT_LOAD, PT_NOTE, NT_PRSTATUS, SHT_STRTAB = 4, 1, 4, 1, 3
PN_XNUM = 0xFFFF
PAGE_SIZE = 0x1000

#: The BIOS ROM block QEMU 7.2 dumps besides RAM on a ``pc`` machine.
BIOS_BASE, BIOS_SIZE = 0xFFFC0000, 0x40000
#: Bytes read from the guest and written at a time: the ELF of a multi-GiB guest streams through this.
CHUNK_SIZE = 16 << 20

ELF_HEADER = {64: struct.Struct("<16sHHIQQQIHHHHHH"), 32: struct.Struct("<16sHHIIIIIHHHHHH")}
SECTION_HEADER = {64: struct.Struct("<IIQQQQIIQQ"), 32: struct.Struct("<10I")}
PROGRAM_HEADER = {64: struct.Struct("<IIQQQQQQ"), 32: struct.Struct("<8I")}

X86_64_USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
                    "rsi", "rdi", "orig_rax", "rip", "cs", "rflags", "rsp", "ss", "fs_base", "gs_base",
                    "ds", "es", "fs", "gs")
#: char pad1[32]; u32 pid; char pad2[76]; user_regs_struct regs; char pad3[8]
X86_64_PRSTATUS = struct.Struct("<32xI76x27Q8x")
#: char pad1[24]; u32 pid; char pad2[44]; ebx ecx edx esi edi ebp eax; ds es fs gs (u16 + pad);
#: orig_eax eip; cs (u16 + pad); eflags esp; ss (u16 + pad); char pad3[4]
I386_PRSTATUS = struct.Struct("<24xI44x7IH2xH2xH2xH2x2IH2x2IH2x4x")
QEMU_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
QEMU_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


def bios_rom() -> bytes:
    """A stand-in BIOS image: a counting pattern ending in SeaBIOS's reset-vector far jump."""
    rom = bytearray((np.arange(BIOS_SIZE // 4, dtype="<u4") * 0x9E3779B1).tobytes())
    rom[-16:-11] = b"\xea\x5b\xe0\x00\xf0"
    return bytes(rom)


def note(name: bytes, note_type: int, desc: bytes) -> bytes:
    """One ELF note: header, NUL-terminated name and descriptor, each padded to 4 bytes."""
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name) + 1, len(desc), note_type) + pad(name + b"\0") + pad(desc)


def prstatus_note(cpu: CpuState, machine: int) -> bytes:
    """The ``CORE`` NT_PRSTATUS note QEMU writes for ``cpu`` (x86-64 or i386 layout)."""
    regs = cpu.registers
    if machine == EM_X86_64:
        desc = X86_64_PRSTATUS.pack(cpu.index + 1, *(regs.get(name, 0) for name in X86_64_USER_REGS))
    else:
        word = lambda name: regs.get(name, 0) & 0xFFFFFFFF  # noqa: E731
        selector = lambda name: regs.get(name, 0) & 0xFFFF  # noqa: E731
        desc = I386_PRSTATUS.pack(
            cpu.index + 1, *map(word, ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rax")),
            *map(selector, ("ds", "es", "fs", "gs")), word("orig_rax"), word("rip"), selector("cs"),
            word("rflags"), word("rsp"), selector("ss"))
    return note(b"CORE", NT_PRSTATUS, desc)


def qemu_cpu_note(cpu: CpuState, size: int = 0x1B8) -> bytes:
    """The ``QEMU`` note holding QEMUCPUState version 1 (``size`` 0x1B0 lacks kernel_gs_base)."""
    regs = cpu.registers
    segments = b"".join(
        struct.pack("<IIIIQ", regs.get(name, 0), 0xFFFFFFFF, 0, 0, regs.get(f"{name}_base", 0))
        for name in QEMU_SEGMENTS)
    crs = [regs.get(f"cr{n}", 0) for n in range(5)]
    state = struct.pack("<II18Q", 1, size, *(regs.get(name, 0) for name in QEMU_GPRS)) + segments
    state += struct.pack("<5QQ", *crs, regs.get("kernel_gs_base", 0))
    return note(b"QEMU", 0, state[:size])


def _guest_value(guest: object, *names: str) -> object:
    """The first of ``guest``'s attributes present, called when it is a method."""
    for name in names:
        value = getattr(guest, name, None)
        if value is not None:
            return value() if callable(value) else value
    return None


def _stream(out, guest: object, start: int, end: int, chunk_size: int) -> None:
    """Copy guest physical ``[start, end)`` to ``out``, seeking over all-zero chunks (sparse file)."""
    buffer = bytearray(min(chunk_size, end - start))
    view = memoryview(buffer)
    for address in range(start, end, chunk_size):
        chunk = view[:min(chunk_size, end - address)]
        if hasattr(guest, "readinto"):
            guest.readinto(address, chunk)
        else:
            chunk[:] = guest.read(address, len(chunk))
        if np.frombuffer(chunk, np.uint8).any():
            out.write(chunk)
        else:
            out.seek(len(chunk), os.SEEK_CUR)


def write_qemu_elf(path: str | os.PathLike, guest: object, *, elf_class: int = 64,
                   cpus: Sequence[CpuState] | None = None, vmcoreinfo: bytes | None = None, ranges: Iterable[tuple[int, int]] | None = None,
                   pn_xnum: bool = False, qemu72_quirks: bool = True, extra_loads: Iterable[tuple[int, int]] = (),
                   machine: int | None = None, cpu_state_size: int = 0x1B8,
                   chunk_size: int = CHUNK_SIZE) -> list[tuple[int, int, int]]:
    """Write ``guest``'s memory to ``path`` as ``dump-guest-memory -f elf`` would.

    ``guest`` has ``ram`` and ``readinto``/``read`` (a CrashedGuest or any MemorySource); ``cpus``
    defaults to its ``cpu_states``/``cpus()`` and ``vmcoreinfo`` (the whole note record) to its
    ``note``/``vmcoreinfo()``; pass ``b""`` for no VMCOREINFO note. ``ranges`` are the ``[start, end)``
    blocks written, one PT_LOAD each (default: ``guest.ram``). ``extra_loads`` are ``(paddr, length)``
    PT_LOADs that alias bytes already written, as paging-mode dumps have. ``pn_xnum`` puts PN_XNUM in
    ``e_phnum`` and the count in section 0. ``machine`` defaults to x86-64 for ELF64, i386 for ELF32.

    Returns every PT_LOAD as ``(p_paddr, p_offset, p_filesz)``, in program-header order after the
    PT_NOTE (PT_LOAD ``k`` in that list is program header ``k + 1``).
    """
    machine = machine or (EM_X86_64 if elf_class == 64 else EM_386)
    cpus = list(cpus if cpus is not None else _guest_value(guest, "cpu_states", "cpus") or [])
    if vmcoreinfo is None:
        vmcoreinfo = _guest_value(guest, "note", "vmcoreinfo") or b""
    blocks = [(int(start), int(end)) for start, end in (guest.ram if ranges is None else ranges)]
    if qemu72_quirks:
        if any(start < BIOS_BASE + BIOS_SIZE and end > BIOS_BASE for start, end in blocks):
            raise ValueError("a RAM range overlaps the BIOS ROM block QEMU 7.2 adds at 0xfffc0000")
        blocks = sorted(blocks + [(BIOS_BASE, BIOS_BASE + BIOS_SIZE)])
    extra_loads = [(int(paddr), int(length)) for paddr, length in extra_loads]
    if elf_class == 32 and any(end > 1 << 32 for _, end in blocks):
        raise ValueError("an ELFCLASS32 dump cannot hold memory above 4 GiB")

    notes = b"".join(prstatus_note(cpu, machine) for cpu in cpus)
    notes += b"".join(qemu_cpu_note(cpu, cpu_state_size) for cpu in cpus)
    notes += vmcoreinfo + b"\0" * (-len(vmcoreinfo) % 4)

    ehdr, shdr, phdr = ELF_HEADER[elf_class], SECTION_HEADER[elf_class], PROGRAM_HEADER[elf_class]
    section_count = 2 if qemu72_quirks else int(pn_xnum)
    phnum = 1 + len(blocks) + len(extra_loads)
    shoff = ehdr.size if section_count else 0
    phoff = ehdr.size + section_count * shdr.size
    notes_offset = phoff + phnum * phdr.size
    data_offset = notes_offset + len(notes)
    if not qemu72_quirks:
        data_offset += -data_offset % PAGE_SIZE
    loads, offset = [], data_offset
    for start, end in blocks:
        loads.append((start, offset, end - start))
        offset += end - start
    for paddr, length in extra_loads:
        written = [(start, off) for start, off, size in loads[:len(blocks)]
                   if start <= paddr and paddr + length <= start + size]
        if not written:
            raise ValueError(f"extra PT_LOAD {paddr:#x}+{length:#x} lies in no written block")
        loads.append((paddr, written[0][1] + paddr - written[0][0], length))
    shstrtab = b"\0.shstrtab\0"

    ident = b"\x7fELF" + bytes([2 if elf_class == 64 else 1, 1, 1]) + bytes(9)
    headers = ehdr.pack(ident, ET_CORE, machine, 1, 0, phoff, shoff, 0,
                        8 if qemu72_quirks else ehdr.size, phdr.size, PN_XNUM if pn_xnum else phnum,
                        shdr.size if section_count else 0, section_count, 1 if qemu72_quirks else 0)
    if section_count:
        headers += shdr.pack(0, 0, 0, 0, 0, 0, 0, phnum if pn_xnum else 0, 0, 0)
    if qemu72_quirks:
        headers += shdr.pack(1, SHT_STRTAB, 0, 0, offset, len(shstrtab), 0, 0, 0, 0)
    fields = (lambda t, off, paddr, size: (t, 0, off, paddr, paddr, size, size, 0)) if elf_class == 64 else \
             (lambda t, off, paddr, size: (t, off, paddr, paddr, size, size, 0, 0))
    headers += phdr.pack(*fields(PT_NOTE, notes_offset, 0, len(notes)))
    headers += b"".join(phdr.pack(*fields(PT_LOAD, off, paddr, size)) for paddr, off, size in loads)

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a previous dump of mode 0400
    with open(path, "wb") as out:
        out.write(headers + notes)
        out.seek(data_offset)
        for start, end in blocks:
            if (start, end) == (BIOS_BASE, BIOS_BASE + BIOS_SIZE) and qemu72_quirks:
                out.write(bios_rom())
            else:
                _stream(out, guest, start, end, chunk_size)
        if qemu72_quirks:
            out.write(shstrtab)
        out.truncate()
    if qemu72_quirks:
        os.chmod(path, 0o400)
    return loads


class TinyGuest:
    """A small stand-in for the model guest: random bytes in a few RAM ranges, CPUs and a note."""

    def __init__(self, ranges: Sequence[tuple[int, int]], *, seed: int = 1, cpus: Sequence[CpuState] = (),
                 note: bytes | None = None, zero: Sequence[tuple[int, int]] = ()) -> None:
        rng = np.random.default_rng(seed)
        self.ram = np.array(ranges, dtype=np.uint64).reshape(-1, 2)
        self.memory = {int(start): rng.integers(0, 256, int(end - start), dtype=np.uint8) for start, end in self.ram}
        for start, end in zero:
            self._block(start, end - start)[:] = 0
        self.cpu_states = list(cpus)
        self.note = note

    def _block(self, address: int, length: int) -> np.ndarray:
        for start, data in self.memory.items():
            if start <= address and address + length <= start + data.size:
                return data[address - start:address - start + length]
        raise ValueError(f"physical {address:#x}+{length:#x} is not in the guest's RAM")

    def readinto(self, address: int, buffer: memoryview) -> None:
        np.frombuffer(buffer, np.uint8)[:] = self._block(address, len(buffer))

    def read(self, address: int, length: int) -> bytes:
        return self._block(address, length).tobytes()
