"""The boot contract between the model and the bare-metal test guest of ``drivers/``: the
BOOT_PARAMS block the guest reads at :data:`IMAGE_BASE`, the stamp it writes on pages, the
selectors its GDT holds, and the registers each vCPU loads before it halts.

``drivers/guest.S`` repeats these numbers as ``.set`` constants; ``tests/test_guestmodel.py``
checks that both sides agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..formats.dumpheader import layout

#: Physical address where the model's image (boot parameters first) is loaded into the guest.
IMAGE_BASE = 0x400000

#: Physical memory the guest keeps for itself: it stamps pages from here up only.
GUEST_RESERVED_END = 0x200000

#: Every stamped page starts with its own page-frame number and then this magic ("WINDUMP!").
STAMP_MAGIC = 0x21504D55444E4957

BOOT_MAGIC = 0x3130544F4F424457  # "WDBOOT01"
MAX_STAMP_RANGES = 16
MAX_CPUS = 8

#: Flags in BOOT_PARAMS.Flags.
BOOT_FLAG_KEEP_RUNNING = 1  # after publishing, the BSP loops forever changing BusyAddress's page

#: What each vCPU loads before it halts (the values ``CrashedGuest.cpu_states`` expects).
BOOT_CPU = layout(0x200, [
    (0x000, "Gpr", ("<u8", 16)),  # in BOOT_GPR_ORDER
    (0x080, "Rflags", "<u8"),
    (0x088, "GsBase", "<u8"),
    (0x090, "KernelGsBase", "<u8"),
    (0x098, "FsBase", "<u8"),
    (0x0A0, "Dr", ("<u8", 4)),  # dr0-dr3
    (0x0C0, "Dr7", "<u8"),
    (0x0C8, "MxCsr", "<u4"),
    (0x0D0, "Xmm", ("u1", (16, 16))),  # xmm0-xmm15, little endian
])

#: The order of BOOT_CPU.Gpr: the order in which the guest pops them off its frame.
BOOT_GPR_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

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


def boot_params(*, cr3: int, note: bytes, note_address: int, stamp_ranges: np.ndarray, busy_address: int,
                keep_running: bool, registers: Sequence[Mapping[str, int]]) -> np.ndarray:
    """The BOOT_PARAMS record (0-d) that makes the guest boot as the model: ``registers[v]`` is what
    vCPU ``v`` loads (CpuState names); bad counts raise ValueError."""
    if len(stamp_ranges) > MAX_STAMP_RANGES:
        raise ValueError(f"{len(stamp_ranges)} stamp ranges, the boot parameters hold {MAX_STAMP_RANGES}")
    if not 1 <= len(registers) <= MAX_CPUS:
        raise ValueError(f"the guest boots 1 to {MAX_CPUS} vCPUs, not {len(registers)}")
    params = np.zeros((), dtype=BOOT_PARAMS)
    params["Magic"] = BOOT_MAGIC
    params["Cr3"] = cr3
    params["CpuCount"] = len(registers)
    params["NoteSize"] = len(note)
    params["NoteAddress"] = note_address
    params["StampRangeCount"] = len(stamp_ranges)
    params["Flags"] = BOOT_FLAG_KEEP_RUNNING if keep_running else 0
    params["BusyAddress"] = busy_address
    params["StampRanges"][:len(stamp_ranges)] = stamp_ranges
    for v, r in enumerate(registers):
        cpu = params["Cpu"][v]
        cpu["Gpr"] = [r[name] for name in BOOT_GPR_ORDER]
        cpu["Rflags"] = r["rflags"]
        cpu["GsBase"] = r["gs_base"]
        cpu["KernelGsBase"] = r["kernel_gs_base"]
        cpu["FsBase"] = r["fs_base"]
        cpu["Dr"] = [r[f"dr{i}"] for i in range(4)]
        cpu["Dr7"] = r["dr7"]
        cpu["MxCsr"] = r["mxcsr"]
        cpu["Xmm"] = [list(r[f"xmm{i}"].to_bytes(16, "little")) for i in range(16)]
    return params
