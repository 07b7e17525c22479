"""The ELF notes of a QEMU ``dump-guest-memory`` file: the note walker, the per-vCPU register layouts
(QEMU's ``QEMUCPUState`` and the ``CORE`` ``NT_PRSTATUS`` of ``target/i386/arch_dump.c``) and the
guest's VMCOREINFO note.

QEMU writes one PT_NOTE: a ``CORE`` note per vCPU, then a ``QEMU`` note per vCPU, both in QEMU's
CPU order, then the note the guest published through the vmcoreinfo device, copied verbatim.
Every layout is data; ``tests/test_elf_source.py`` pins the offsets.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import FormatError
from .dumpheader import layout

#: Elf32_Nhdr and Elf64_Nhdr are the same three words; QEMU pads name and descriptor to 4 bytes.
NOTE_HEADER = layout(12, [(0, "n_namesz", "<u4"), (4, "n_descsz", "<u4"), (8, "n_type", "<u4")])
NOTE_ALIGN = 4

NT_PRSTATUS = 1
CORE_NOTE_NAME = b"CORE"
QEMU_NOTE_NAME = b"QEMU"
VMCOREINFO_NOTE_NAME = b"VMCOREINFO"

QEMU_CPU_STATE_VERSION = 1
QEMU_CPU_SEGMENT = layout(24, [(0, "selector", "<u4"), (4, "limit", "<u4"), (8, "flags", "<u4"), (16, "base", "<u8")])
QEMU_CPU_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
QEMU_CPU_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")

#: QEMUCPUState; later QEMU releases appended kernel_gs_base, so ``size`` is 0x1B0 or 0x1B8.
QEMU_CPU_STATE = layout(0x1B8, [
    (0x000, "version", "<u4"),
    (0x004, "size", "<u4"),
    *[(0x008 + 8 * i, name, "<u8") for i, name in enumerate(QEMU_CPU_GPRS)],
    *[(0x098 + 24 * i, name, QEMU_CPU_SEGMENT) for i, name in enumerate(QEMU_CPU_SEGMENTS)],
    (0x188, "cr", ("<u8", 5)),
    (0x1B0, "kernel_gs_base", "<u8"),
])
QEMU_CPU_STATE_MIN_SIZE = 0x1B0

#: Linux's x86-64 ``elf_prstatus`` as QEMU fills it: user_regs_struct at 112.
X86_64_USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
                    "rsi", "rdi", "orig_rax", "rip", "cs", "rflags", "rsp", "ss", "fs_base", "gs_base",
                    "ds", "es", "fs", "gs")
PRSTATUS_X86_64 = layout(336, [(32, "pr_pid", "<u4"),
                               *[(112 + 8 * i, name, "<u8") for i, name in enumerate(X86_64_USER_REGS)]])

#: Linux's i386 ``elf_prstatus`` (QEMU writes it when the first vCPU is not in long mode): regs at 72,
#: 32-bit words, the selectors in the low half of theirs.
I386_USER_REGS = ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rax", "ds", "es", "fs", "gs", "orig_rax",
                  "rip", "cs", "rflags", "rsp", "ss")
I386_SELECTORS = {"ds", "es", "fs", "gs", "cs", "ss"}
PRSTATUS_I386 = layout(144, [(24, "pr_pid", "<u4"),
                             *[(72 + 4 * i, name, "<u2" if name in I386_SELECTORS else "<u4")
                               for i, name in enumerate(I386_USER_REGS)]])

PRSTATUS_LAYOUTS = {PRSTATUS_X86_64.itemsize: PRSTATUS_X86_64, PRSTATUS_I386.itemsize: PRSTATUS_I386}


class ElfNote(NamedTuple):
    """One note of a PT_NOTE segment; ``record`` is the whole note as it lies in the file."""

    name: bytes
    type: int
    desc: bytes
    record: bytes


def _align(n: int) -> int:
    return (n + NOTE_ALIGN - 1) & -NOTE_ALIGN


def parse_notes(segment: bytes, where: str) -> list[ElfNote]:
    """The notes packed in ``segment``; ``where`` names it in errors (``"guest.elf: PT_NOTE 0"``)."""
    notes: list[ElfNote] = []
    pos = 0
    while pos < len(segment):
        if len(segment) - pos < NOTE_HEADER.itemsize:
            raise FormatError(f"{where}: truncated in the header of note {len(notes)} at segment offset {pos:#x}")
        header = np.frombuffer(segment, NOTE_HEADER, 1, pos)[0]
        namesz, descsz = int(header["n_namesz"]), int(header["n_descsz"])
        desc_start = pos + NOTE_HEADER.itemsize + _align(namesz)
        if desc_start + descsz > len(segment):
            raise FormatError(f"{where}: note {len(notes)} claims a {namesz}-byte name and a {descsz}-byte "
                              f"descriptor, past the end of its {len(segment)}-byte segment")
        name = segment[pos + NOTE_HEADER.itemsize:pos + NOTE_HEADER.itemsize + namesz].split(b"\0", 1)[0]
        end = min(desc_start + _align(descsz), len(segment))
        notes.append(ElfNote(name, int(header["n_type"]), segment[desc_start:desc_start + descsz], segment[pos:end]))
        pos = end
    return notes


def _qemu_cpu_registers(desc: bytes, where: str) -> dict[str, int]:
    """Registers from a ``QEMU`` note's QEMUCPUState."""
    if len(desc) < QEMU_CPU_STATE_MIN_SIZE:
        raise FormatError(f"{where}: QEMU CPU state note of {len(desc)} bytes is shorter than QEMUCPUState "
                          f"({QEMU_CPU_STATE_MIN_SIZE:#x} bytes)")
    state = np.frombuffer(desc[:QEMU_CPU_STATE.itemsize].ljust(QEMU_CPU_STATE.itemsize, b"\0"), QEMU_CPU_STATE)[0]
    if int(state["version"]) != QEMU_CPU_STATE_VERSION:
        raise FormatError(f"{where}: QEMUCPUState version {int(state['version'])} is not the known version "
                          f"{QEMU_CPU_STATE_VERSION}")
    registers = {name: int(state[name]) for name in QEMU_CPU_GPRS}
    registers.update({name: int(state[name]["selector"]) for name in QEMU_CPU_SEGMENTS[:6]})
    registers["fs_base"] = int(state["fs"]["base"])
    registers["gs_base"] = int(state["gs"]["base"])
    registers.update({f"cr{n}": int(state["cr"][n]) for n in (0, 2, 3, 4)})
    if min(int(state["size"]), len(desc)) >= QEMU_CPU_STATE.itemsize:
        registers["kernel_gs_base"] = int(state["kernel_gs_base"])
    return registers


def _prstatus_registers(desc: bytes, where: str) -> dict[str, int]:
    """Registers from a ``CORE`` NT_PRSTATUS note, x86-64 or i386 by its size."""
    prstatus = PRSTATUS_LAYOUTS.get(len(desc))
    if prstatus is None:
        raise FormatError(f"{where}: CORE NT_PRSTATUS note of {len(desc)} bytes is neither the x86-64 "
                          f"({PRSTATUS_X86_64.itemsize}) nor the i386 ({PRSTATUS_I386.itemsize}) prstatus")
    regs = np.frombuffer(desc, prstatus)[0]
    return {name: int(regs[name]) for name in prstatus.names or () if name not in ("pr_pid", "orig_rax")}


def cpu_registers(notes: list[ElfNote], where: str) -> list[dict[str, int]]:
    """Each vCPU's registers in QEMU's CPU order, named as :class:`~windump_plugins.source.CpuState`
    names them: from its QEMU note, else from its CORE note."""
    qemu = [_qemu_cpu_registers(n.desc, where) for n in notes if n.name == QEMU_NOTE_NAME]
    core = [_prstatus_registers(n.desc, where) for n in notes if n.name == CORE_NOTE_NAME and n.type == NT_PRSTATUS]
    return [qemu[i] if i < len(qemu) else core[i] for i in range(max(len(qemu), len(core)))]


def vmcoreinfo_note(notes: list[ElfNote]) -> bytes | None:
    """The guest's VMCOREINFO note, header included, as win_dump.c takes it; None when there is none."""
    return next((n.record for n in notes if n.name == VMCOREINFO_NOTE_NAME), None)
