"""The KDDEBUGGER_DATA64 layout and KDBG decoding against REFERENCE.md section 5 (copied from the
reference, not from our code or the model guest), and encode/decode as inverses."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from windump_plugins.formats.kdbg import KDBG_READ_SIZE, KDDEBUGGER_DATA64, OWNER_TAG, decode_kdbg, encode_kdbg

#: REFERENCE.md section 5, "KDBG (KDDEBUGGER_DATA64, same 64-bit layout on x86 Windows)": each field
#: windump reads, its offset and its type (the u64 fields hold addresses of kernel variables).
REFERENCE_KDBG = {
    "OwnerTag": (0x10, "S4"),  # "KDBG"
    "Size": (0x14, "<u4"),
    "KernBase": (0x18, "<u8"),
    "PsLoadedModuleList": (0x48, "<u8"),
    "PsActiveProcessHead": (0x50, "<u8"),
    "KiBugcheckData": (0x88, "<u8"),
    "MmPfnDatabase": (0xC0, "<u8"),
    "KiProcessorBlock": (0x218, "<u8"),
    "MmPhysicalMemoryBlock": (0x270, "<u8"),
    "SizePrcb": (0x2B0, "<u2"),
    "OffsetPrcbNumber": (0x2BE, "<u2"),
    "SizePcr": (0x2E0, "<u2"),
    "OffsetPcrContainedPrcb": (0x2E6, "<u2"),
    "OffsetPrcbContext": (0x338, "<u2"),
}

KI_WAIT_NEVER = 0x5A3C96F01E2D4B87
KI_WAIT_ALWAYS = 0x0123456789ABCDEF
KDP_DATA_BLOCK_ENCODED = 0xFFFFF80652605040
ENCODED_TAG_WORD = 0xD88A7AD38E970761
PLAIN_TAG_WORD = 0x000003684742444B  # "KDBG", then Size 0x368


@pytest.mark.parametrize("name, expected", REFERENCE_KDBG.items())
def test_field_offset_and_type_are_the_references(name, expected):
    dtype, offset = KDDEBUGGER_DATA64.fields[name][:2]
    assert (offset, dtype) == (expected[0], np.dtype(expected[1]))


def test_layout_holds_the_reference_fields_and_reads_whole_words():
    """No field beyond the reference's; the read reaches OffsetPrcbContext's end, in whole 64-bit words
    (the decoding works word by word), and stays inside the 0x368 bytes a KDBG's Size gives."""
    assert set(KDDEBUGGER_DATA64.names) == set(REFERENCE_KDBG)
    last = REFERENCE_KDBG["OffsetPrcbContext"][0] + 2
    assert KDBG_READ_SIZE == KDDEBUGGER_DATA64.itemsize
    assert last <= KDBG_READ_SIZE < last + 8 and KDBG_READ_SIZE % 8 == 0
    assert KDBG_READ_SIZE <= 0x368


def test_known_answer_decodes_to_kdbg_and_its_size():
    plain = decode_kdbg(struct.pack("<Q", ENCODED_TAG_WORD), KI_WAIT_NEVER, KI_WAIT_ALWAYS, KDP_DATA_BLOCK_ENCODED)
    assert struct.unpack("<Q", plain)[0] == PLAIN_TAG_WORD
    assert plain[:4] == OWNER_TAG and struct.unpack_from("<I", plain, 4)[0] == 0x368


def test_known_answer_encodes_back():
    encoded = encode_kdbg(struct.pack("<Q", PLAIN_TAG_WORD), KI_WAIT_NEVER, KI_WAIT_ALWAYS, KDP_DATA_BLOCK_ENCODED)
    assert struct.unpack("<Q", encoded)[0] == ENCODED_TAG_WORD


def test_decode_inverts_encode_for_every_rotation():
    """Every rotation count (KiWaitNever & 63), 0 included, round-trips a whole KDBG."""
    data = np.random.default_rng(6).bytes(KDDEBUGGER_DATA64.itemsize)
    for rotation in range(64):
        never = (KI_WAIT_NEVER & ~63) | rotation
        encoded = encode_kdbg(data, never, KI_WAIT_ALWAYS, KDP_DATA_BLOCK_ENCODED)
        assert encoded != data
        assert decode_kdbg(encoded, never, KI_WAIT_ALWAYS, KDP_DATA_BLOCK_ENCODED) == data
