"""KDDEBUGGER_DATA64 (the KDBG block) and the Windows 8+ scheme that keeps it encoded in memory.

The u64 fields hold addresses of kernel variables, not their values: KiBugcheckData is the address
of the bug-check array, MmPfnDatabase the address of ``nt!MmPfnDatabase``.
"""

from __future__ import annotations

import numpy as np

from .dumpheader import layout

OWNER_TAG = b"KDBG"

KDDEBUGGER_DATA64 = layout(0x340, [
    (0x010, "OwnerTag", "S4"),
    (0x014, "Size", "<u4"),
    (0x018, "KernBase", "<u8"),
    (0x048, "PsLoadedModuleList", "<u8"),
    (0x050, "PsActiveProcessHead", "<u8"),
    (0x088, "KiBugcheckData", "<u8"),
    (0x0C0, "MmPfnDatabase", "<u8"),
    (0x218, "KiProcessorBlock", "<u8"),
    (0x270, "MmPhysicalMemoryBlock", "<u8"),
    (0x2B0, "SizePrcb", "<u2"),
    (0x2BE, "OffsetPrcbNumber", "<u2"),
    (0x2E0, "SizePcr", "<u2"),
    (0x2E6, "OffsetPcrContainedPrcb", "<u2"),
    (0x338, "OffsetPrcbContext", "<u2"),
])

#: Bytes of KDBG windump reads: through OffsetPrcbContext.
KDBG_READ_SIZE = KDDEBUGGER_DATA64.itemsize

_MASK = (1 << 64) - 1


def _words(data: bytes) -> np.ndarray:
    if len(data) % 8:
        raise ValueError("KDBG data must be a whole number of 64-bit words")
    return np.frombuffer(data, dtype="<u8").copy()


def _rol(q: np.ndarray, n: int) -> np.ndarray:
    n &= 63
    return q if n == 0 else (q << np.uint64(n)) | (q >> np.uint64(64 - n))


def _ror(q: np.ndarray, n: int) -> np.ndarray:
    return _rol(q, 64 - (n & 63))


def decode_kdbg(data: bytes, ki_wait_never: int, ki_wait_always: int, kdp_data_block_encoded: int) -> bytes:
    """Decode ``data`` taken from an encoded ``nt!KdDebuggerDataBlock``.

    Per 64-bit word: ``bswap64(rol64(q ^ KiWaitNever, KiWaitNever & 63) ^ &KdpDataBlockEncoded) ^
    KiWaitAlways``; the arguments are the two variables' values and the third variable's address.
    """
    q = _words(data) ^ np.uint64(ki_wait_never & _MASK)
    q = _rol(q, ki_wait_never) ^ np.uint64(kdp_data_block_encoded & _MASK)
    return (q.byteswap() ^ np.uint64(ki_wait_always & _MASK)).tobytes()


def encode_kdbg(data: bytes, ki_wait_never: int, ki_wait_always: int, kdp_data_block_encoded: int) -> bytes:
    """The inverse of :func:`decode_kdbg`, as the Windows kernel applies it."""
    q = (_words(data) ^ np.uint64(ki_wait_always & _MASK)).byteswap() ^ np.uint64(kdp_data_block_encoded & _MASK)
    return (_ror(q, ki_wait_never) ^ np.uint64(ki_wait_never & _MASK)).tobytes()
