"""Where the model of a crashed Windows x64 kernel puts things, physically in its image and virtually
in the kernel's address space, and the values of the crash it records.

The addresses are Windows 10 x64 style; the processor geometry and the values are the model's own,
not those of a Windows build.
"""

from __future__ import annotations

from ..formats.dumpheader import PAGE_SIZE

# -- guest virtual layout ------------------------------------------------------------------------

KERNEL_BASE = 0xFFFFF806_52000000  # nt, one 2 MiB page
KERNEL_DATA = KERNEL_BASE + 0x200000  # 4 KiB pages right after nt's large page
KERNEL_DATA_PAGES = 7
LOW_MEMORY_ALIAS = 0xFFFFD000_00000000  # a 1 GiB page over physical [0, 1 GiB): the KPCRs
PFN_DATABASE = 0xFFFFB700_00000000  # value of nt!MmPfnDatabase; the array itself is not mapped

#: nt's variables page (KERNEL_BASE + 0x1000), in nt's large page.
VARIABLES = KERNEL_BASE + 0x1000
#: In the KERNEL_DATA pages: the KDBG crosses from the first page into the second.
KDBG = KERNEL_DATA + 0xE00
DECODED_KDBG = KERNEL_DATA + 0x2040
DESCRIPTOR = KERNEL_DATA + 0x3000
CONTEXTS = KERNEL_DATA + 0x4000  # three per page, CONTEXT_STRIDE apart
CONTEXT_STRIDE = 0x500

# -- physical layout of the image, as offsets from IMAGE_BASE -------------------------------------

IMAGE_NOTE = 0x2000
IMAGE_TABLES = 0x5000  # page-table pool, up to IMAGE_KUSER
IMAGE_KUSER = 0x10000
IMAGE_KERNEL_DATA = 0x20000  # the KERNEL_DATA_PAGES pages
IMAGE_PCRS = 0x40000
IMAGE_KERNEL = 0x200000  # nt's large page
IMAGE_SIZE = IMAGE_KERNEL + 2 * PAGE_SIZE  # nt's header page and its variables page

# -- processor-block geometry the KDBG advertises -------------------------------------------------

KDBG_SIZE = 0x368
OFFSET_PCR_CONTAINED_PRCB = 0x180
SIZE_PCR = 0x4000
SIZE_PRCB = SIZE_PCR - OFFSET_PCR_CONTAINED_PRCB
OFFSET_PRCB_NUMBER = 0x24
OFFSET_PRCB_CONTEXT = 0x6D8
OFFSET_PCR_SELF = 0x18
OFFSET_PCR_CURRENT_PRCB = 0x20

# -- the crash ------------------------------------------------------------------------------------

#: KiWaitNever / KiWaitAlways values (REFERENCE section 5's known answer).
KI_WAIT_NEVER = 0x5A3C96F01E2D4B87
KI_WAIT_ALWAYS = 0x0123456789ABCDEF

#: The crash's wall clock (KUSER SystemTime): 2024-01-01 00:00:00 UTC as a FILETIME.
SYSTEM_TIME = (1704067200 + 11644473600) * 10**7
#: Uptime at the crash (KUSER InterruptTime), and when the driver captured the header after boot.
INTERRUPT_TIME = 4980 * 10**7
HEADER_UPTIME = 15 * 10**7
NT_PRODUCT_WIN_NT = 1
SUITE_MASK = 0x110  # VER_SUITE_TERMINAL | VER_SUITE_SINGLEUSERTS, as on a client edition
BUGCHECK_PARAMETERS = (0xFFFFF806_52011111, 0x2222, 0x3333_0000_0000, 0x4444)
