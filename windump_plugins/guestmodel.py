"""One model of a crashed Windows x64 guest: the memory the ``sample:`` source serves, the fixtures
of the unit tests, and the structures the bare-metal test guest in ``drivers/`` boots with.

INTERFACE STUB (to be implemented): the boot-parameter layout below is fixed, because the guest in
``drivers/`` reads it; the rest of the API is described in ``CrashedGuest``'s docstring.
"""

from __future__ import annotations

import numpy as np

from .format import layout

#: Physical address where the model's image (boot parameters first) is loaded into the guest.
IMAGE_BASE = 0x400000

#: Every stamped page starts with its own page-frame number and then this magic ("WINDUMP!").
STAMP_MAGIC = 0x21504D55444E4957

BOOT_MAGIC = 0x3130544F4F424457  # "WDBOOT01"
MAX_STAMP_RANGES = 16
MAX_CPUS = 8

#: Flags in BOOT_PARAMS.Flags.
BOOT_FLAG_KEEP_RUNNING = 1  # after publishing, the BSP loops forever changing BusyAddress's page

#: What each vCPU loads before it halts (the values :attr:`CrashedGuest.cpu_states` expects).
BOOT_CPU = layout(0x200, [
    (0x000, "Gpr", ("<u8", 16)),  # rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15
    (0x080, "Rflags", "<u8"),
    (0x088, "GsBase", "<u8"),
    (0x090, "KernelGsBase", "<u8"),
    (0x098, "FsBase", "<u8"),
    (0x0A0, "Dr", ("<u8", 4)),  # dr0-dr3
    (0x0C0, "Dr7", "<u8"),
    (0x0C8, "MxCsr", "<u4"),
    (0x0D0, "Xmm", ("u1", (16, 16))),  # xmm0-xmm15, little endian
])

#: The block at IMAGE_BASE that the bare-metal guest reads at boot.
BOOT_PARAMS = layout(0x1200, [
    (0x000, "Magic", "<u8"),
    (0x008, "Cr3", "<u8"),  # the model's PML4: identity-maps low memory and maps the kernel
    (0x010, "CpuCount", "<u4"),
    (0x014, "NoteSize", "<u4"),  # 24 + 0x2000
    (0x018, "NoteAddress", "<u8"),  # physical address of the VMCOREINFO note to publish
    (0x020, "StampRangeCount", "<u4"),
    (0x024, "Flags", "<u4"),
    (0x028, "BusyAddress", "<u8"),  # physical page the running variant keeps changing
    (0x040, "StampRanges", ("<u8", (MAX_STAMP_RANGES, 2))),  # [start, end) pages to stamp
    (0x200, "Cpu", (BOOT_CPU, MAX_CPUS)),
])

#: Kernel selectors as a real Windows x64 kernel has them; the test guest's GDT matches.
KERNEL_SELECTORS = {"cs": 0x10, "ss": 0x18, "ds": 0x2B, "es": 0x2B, "fs": 0x53, "gs": 0x2B}


def stamp_page(pfn: int) -> np.ndarray:
    """The first 16 bytes of a stamped page: its page-frame number, then :data:`STAMP_MAGIC`."""
    return np.array([pfn, STAMP_MAGIC], dtype="<u8")
