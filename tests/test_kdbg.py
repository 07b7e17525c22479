"""KDBG decoding against the known answer of REFERENCE section 5 (worked from the published
formula, not from our code), and encode/decode as inverses."""

from __future__ import annotations

import struct

import numpy as np

from windump_plugins.formats.kdbg import KDDEBUGGER_DATA64, OWNER_TAG, decode_kdbg, encode_kdbg

KI_WAIT_NEVER = 0x5A3C96F01E2D4B87
KI_WAIT_ALWAYS = 0x0123456789ABCDEF
KDP_DATA_BLOCK_ENCODED = 0xFFFFF80652605040
ENCODED_TAG_WORD = 0xD88A7AD38E970761
PLAIN_TAG_WORD = 0x000003684742444B  # "KDBG", then Size 0x368


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
