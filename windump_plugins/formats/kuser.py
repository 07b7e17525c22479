"""KUSER_SHARED_DATA, the page every Windows kernel maps at one fixed address: where it is, and the
fields windump reads from it (the clocks, the product type and suite mask)."""

from __future__ import annotations

from .dumpheader import layout

#: Where every Windows x64 kernel maps KUSER_SHARED_DATA.
KUSER_SHARED_DATA = 0xFFFFF780_00000000
KUSER_INTERRUPT_TIME = 0x08  # KSYSTEM_TIME, 100 ns since boot
KUSER_SYSTEM_TIME = 0x14  # KSYSTEM_TIME, FILETIME (100 ns since 1601, UTC)
KUSER_NT_PRODUCT_TYPE = 0x264
KUSER_SUITE_MASK = 0x2D0

#: KSYSTEM_TIME: the kernel writes High2Time, LowPart, then High1Time, so a reader that sees
#: High1Time == High2Time holds a value that was not being updated.
KSYSTEM_TIME = layout(12, [(0, "LowPart", "<u4"), (4, "High1Time", "<u4"), (8, "High2Time", "<u4")])
