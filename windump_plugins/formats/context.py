"""The AMD64 CONTEXT record as a numpy structured dtype, and a builder from a vCPU's registers.

A dump carries CONTEXTs twice: one in the header's ContextRecord and one per processor, where
KPRCB + OffsetPrcbContext points. Field names are those of ``winnt.h``; ``M128A`` registers are
stored as two little-endian u64 halves.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .dumpheader import layout

CONTEXT_AMD64 = 0x100000
CONTEXT_CONTROL = CONTEXT_AMD64 | 0x1  # Rip, Rsp, EFlags, SegCs, SegSs
CONTEXT_INTEGER = CONTEXT_AMD64 | 0x2  # Rax .. R15
CONTEXT_SEGMENTS = CONTEXT_AMD64 | 0x4  # SegDs, SegEs, SegFs, SegGs
CONTEXT_FLOATING_POINT = CONTEXT_AMD64 | 0x8  # FltSave, MxCsr
CONTEXT_DEBUG_REGISTERS = CONTEXT_AMD64 | 0x10  # Dr0-3, Dr6, Dr7
CONTEXT_ALL_AMD64 = 0x10001F

#: MXCSR after reset and as Windows runs kernel code: all exceptions masked, round to nearest.
MXCSR_DEFAULT = 0x1F80

M128A = layout(0x10, [(0x0, "Low", "<u8"), (0x8, "High", "<u8")])

XSAVE_FORMAT = layout(0x200, [
    (0x00, "ControlWord", "<u2"),
    (0x02, "StatusWord", "<u2"),
    (0x04, "TagWord", "u1"),  # abridged: bit i set = ST(i) register in use
    (0x05, "Reserved1", "u1"),
    (0x06, "ErrorOpcode", "<u2"),
    (0x08, "ErrorOffset", "<u4"),
    (0x0C, "ErrorSelector", "<u2"),
    (0x0E, "Reserved2", "<u2"),
    (0x10, "DataOffset", "<u4"),
    (0x14, "DataSelector", "<u2"),
    (0x16, "Reserved3", "<u2"),
    (0x18, "MxCsr", "<u4"),
    (0x1C, "MxCsr_Mask", "<u4"),
    (0x20, "FloatRegisters", (M128A, 8)),
    (0xA0, "XmmRegisters", (M128A, 16)),
    (0x1A0, "Reserved4", ("u1", 96)),
])

_GENERAL_REGISTERS = ("Rax", "Rcx", "Rdx", "Rbx", "Rsp", "Rbp", "Rsi", "Rdi",
                      "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")
_SEGMENT_REGISTERS = ("SegCs", "SegDs", "SegEs", "SegFs", "SegGs", "SegSs")
_DEBUG_REGISTERS = ("Dr0", "Dr1", "Dr2", "Dr3", "Dr6", "Dr7")

CONTEXT = layout(0x4D0, [
    *[(0x08 * i, f"P{i + 1}Home", "<u8") for i in range(6)],
    (0x30, "ContextFlags", "<u4"),
    (0x34, "MxCsr", "<u4"),
    *[(0x38 + 2 * i, name, "<u2") for i, name in enumerate(_SEGMENT_REGISTERS)],
    (0x44, "EFlags", "<u4"),
    *[(0x48 + 8 * i, name, "<u8") for i, name in enumerate(_DEBUG_REGISTERS)],
    *[(0x78 + 8 * i, name, "<u8") for i, name in enumerate(_GENERAL_REGISTERS)],
    (0xF8, "Rip", "<u8"),
    (0x100, "FltSave", XSAVE_FORMAT),
    (0x300, "VectorRegister", (M128A, 26)),
    (0x4A0, "VectorControl", "<u8"),
    (0x4A8, "DebugControl", "<u8"),
    (0x4B0, "LastBranchToRip", "<u8"),
    (0x4B8, "LastBranchFromRip", "<u8"),
    (0x4C0, "LastExceptionToRip", "<u8"),
    (0x4C8, "LastExceptionFromRip", "<u8"),
])

# CpuState register name -> CONTEXT field, grouped by the ContextFlags bit that declares them.
_CONTROL = {"rip": "Rip", "rsp": "Rsp", "rflags": "EFlags", "cs": "SegCs", "ss": "SegSs"}
_INTEGER = {name.lower(): name for name in _GENERAL_REGISTERS if name != "Rsp"}
_SEGMENTS = {"ds": "SegDs", "es": "SegEs", "fs": "SegFs", "gs": "SegGs"}
_DEBUG = {name.lower(): name for name in _DEBUG_REGISTERS}
# gdb's x87 names -> XSAVE_FORMAT fields (ftag is converted: gdb gives the full tag word).
_X87 = {"fctrl": "ControlWord", "fstat": "StatusWord", "fop": "ErrorOpcode", "fioff": "ErrorOffset",
        "fiseg": "ErrorSelector", "fooff": "DataOffset", "foseg": "DataSelector"}

_U64 = (1 << 64) - 1


def _set_m128(entry: np.ndarray, value: int) -> None:
    entry["Low"] = value & _U64
    entry["High"] = (value >> 64) & _U64


def abridged_tag_word(full_tag_word: int) -> int:
    """The FXSAVE 8-bit tag (bit i set = register i in use) of an x87 16-bit tag word (11 = empty)."""
    return sum(1 << i for i in range(8) if (full_tag_word >> (2 * i)) & 3 != 3)


def context_from_registers(registers: Mapping[str, int]) -> np.ndarray:
    """A 0-d CONTEXT holding what ``registers`` (names as in :class:`~windump_plugins.source.CpuState`)
    has; ContextFlags declares exactly the groups present, and MxCsr goes to both of its places
    (kdmp-parser rejects a CONTEXT whose two copies differ)."""
    context = np.zeros((), dtype=CONTEXT)
    flags = CONTEXT_AMD64
    for group_flag, names in ((CONTEXT_CONTROL, _CONTROL), (CONTEXT_INTEGER, _INTEGER),
                              (CONTEXT_SEGMENTS, _SEGMENTS), (CONTEXT_DEBUG_REGISTERS, _DEBUG)):
        for register, field in names.items():
            if register in registers:
                context[field] = registers[register]
                flags |= group_flag
    save = context["FltSave"]
    for register, field in _X87.items():
        if register in registers:
            save[field] = registers[register]
            flags |= CONTEXT_FLOATING_POINT
    if "ftag" in registers:
        save["TagWord"] = abridged_tag_word(registers["ftag"])
        flags |= CONTEXT_FLOATING_POINT
    if "mxcsr" in registers:
        context["MxCsr"] = save["MxCsr"] = registers["mxcsr"]
        flags |= CONTEXT_FLOATING_POINT
    if "mxcsr_mask" in registers:
        save["MxCsr_Mask"] = registers["mxcsr_mask"]
    for i in range(16):
        if f"xmm{i}" in registers:
            _set_m128(save["XmmRegisters"][i], registers[f"xmm{i}"])
            flags |= CONTEXT_FLOATING_POINT
    for i in range(8):
        if f"st{i}" in registers:
            _set_m128(save["FloatRegisters"][i], registers[f"st{i}"] & ((1 << 80) - 1))
            flags |= CONTEXT_FLOATING_POINT
    context["ContextFlags"] = flags
    return context
