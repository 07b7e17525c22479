"""The difference table and the comparison built on it, on synthetic pairs of dumps: a copy of a
sample dump with bytes changed inside or outside the masked regions."""

from __future__ import annotations

import re
import shutil

import pytest
from difftable import (
    Row,
    assert_same_outside_differences,
    difference_mask,
    header_field_name,
    load_differences,
)

from windump_plugins.errors import FormatError
from windump_plugins.formats.context import CONTEXT
from windump_plugins.formats.dumpheader import DUMP_HEADER64, PAGE_SHIFT, PAGE_SIZE
from windump_plugins.guest.model import CrashedGuest
from windump_plugins.save import save
from windump_plugins.sources.sample import SampleSource

HEADER_SIZE = DUMP_HEADER64.itemsize

#: RAM enough for the model's image and nt's 2 MiB page, in two ranges: small dumps, fast tests.
SMALL_RAM = ((0, 0xA0000), (0x100000, 0x800000))


def file_offset(guest: CrashedGuest, physical: int) -> int:
    """Where a full dump of ``guest`` keeps ``physical``: the header, then the runs' pages in order."""
    page, within = divmod(physical, PAGE_SIZE)
    pages_before = 0
    for base, count in guest.windows_runs().tolist():
        if base <= page < base + count:
            return HEADER_SIZE + (pages_before + page - base) * PAGE_SIZE + within
        pages_before += count
    raise AssertionError(f"physical {physical:#x} is in no run of the model")


def context_bytes(guest: CrashedGuest) -> set[int]:
    """File offsets of every byte of every processor's CONTEXT, found through the model."""
    offsets = set()
    for context in guest.context_addresses:
        for va in range(context, context + CONTEXT.itemsize):
            offsets.add(file_offset(guest, guest.virtual_to_physical(va)))
    return offsets


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A 3-processor guest with an encoded KDBG (so the dump's KdDebuggerDataBlock is the decoded
    copy) whose Windows processor order differs from the vCPU order, and its dump."""
    guest = CrashedGuest(ram=SMALL_RAM, cpus=3, encoded_kdbg=True, processor_order=(2, 0, 1))
    path = tmp_path_factory.mktemp("difftable") / "ours.dmp"
    save(SampleSource(guest), path)
    return guest, path


@pytest.fixture
def pair(sample, tmp_path):
    """The sample dump and a writable copy of it to change."""
    guest, ours = sample
    theirs = tmp_path / "qemu.dmp"
    shutil.copyfile(ours, theirs)
    return guest, ours, theirs


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def failure(ours, theirs, rows=None) -> str:
    with pytest.raises(AssertionError) as raised:
        assert_same_outside_differences(ours, theirs, rows)
    return str(raised.value)


def test_table_rows_are_complete_and_resolve_on_a_dump(sample):
    _guest, dump = sample
    rows = load_differences()
    assert rows, "docs/differences.csv has no rows"
    for row in rows:
        assert row.reason.strip() and re.fullmatch(r"#\d+", row.issue), row
    masked = difference_mask(dump)
    assert {m.row for m in masked} == set(rows), "a row of the table masks nothing"


def test_kprcb_contexts_are_masked_exactly(sample):
    guest, dump = sample
    masked = difference_mask(dump, [Row("body:kprcb-contexts", "test", "#0")])
    covered = {offset for m in masked for offset in range(m.offset, m.offset + m.length)}
    assert covered == context_bytes(guest)


def test_identical_dumps_pass(pair):
    _guest, ours, theirs = pair
    assert_same_outside_differences(ours, theirs)


def test_differences_inside_every_context_pass(pair):
    guest, ours, theirs = pair
    for context in guest.context_addresses:
        for va in (context, context + CONTEXT.itemsize - 1):
            flip(theirs, file_offset(guest, guest.virtual_to_physical(va)))
    assert_same_outside_differences(ours, theirs)


def test_byte_after_a_context_fails_and_names_its_physical_address(pair):
    guest, ours, theirs = pair
    physical = guest.virtual_to_physical(guest.context_addresses[0] + CONTEXT.itemsize)
    flip(theirs, file_offset(guest, physical))
    message = failure(ours, theirs)
    assert f"physical {physical:#x}" in message
    assert "1 regions" in message


@pytest.mark.parametrize("field, offset", [
    ("MinorVersion", 0x00E),
    ("PhysicalMemoryBlock.Run[1].PageCount", 0x088 + 0x10 + 0x10 + 0x8),
    ("PsActiveProcessHead", 0x028 + 0x2),
])
def test_header_byte_outside_the_table_fails_and_names_the_field(pair, field, offset):
    _guest, ours, theirs = pair
    flip(theirs, offset)
    assert f"header {offset:#x}-{offset + 1:#x}: {field}\n" in failure(ours, theirs) + "\n"


def test_a_header_row_masks_its_field_and_nothing_else(pair):
    _guest, ours, theirs = pair
    rows = [Row("header:SystemTime", "test", "#0")]
    system_time = DUMP_HEADER64.fields["SystemTime"][1]
    for offset in (system_time, system_time + 7):
        flip(theirs, offset)
    assert_same_outside_differences(ours, theirs, rows)
    flip(theirs, system_time + 8)  # the first byte of Comment
    assert "Comment" in failure(ours, theirs, rows)


def test_every_differing_region_is_listed(pair):
    guest, ours, theirs = pair
    pages = [int(base) << PAGE_SHIFT for base, _count in guest.windows_runs().tolist()]
    for physical in pages:
        flip(theirs, file_offset(guest, physical))
    message = failure(ours, theirs)
    assert f"{len(pages)} regions" in message
    for physical in pages:
        assert f"physical {physical:#x}" in message


def test_dumps_of_different_lengths_fail(pair):
    _guest, ours, theirs = pair
    with open(theirs, "ab") as f:
        f.write(bytes(PAGE_SIZE))
    assert "bytes" in failure(ours, theirs)


@pytest.mark.parametrize("region", ["header:NoSuchField", "body:no-such-kind", "footer:Signature"])
def test_unknown_regions_are_rejected(sample, region):
    _guest, dump = sample
    with pytest.raises(FormatError, match=re.escape(region)):
        difference_mask(dump, [Row(region, "test", "#0")])


def test_contexts_need_a_plaintext_kdbg(pair):
    guest, _ours, theirs = pair
    kdbg = guest.virtual_to_physical(guest.decoded_kdbg_address + 0x10)  # OwnerTag
    flip(theirs, file_offset(guest, kdbg))
    with pytest.raises(FormatError, match="OwnerTag"):
        difference_mask(theirs)


@pytest.mark.parametrize("offset, name", [
    (0x000, "Signature"),
    (0x03C, "BugCheckCodePad"),
    (0x348, "ContextRecord[0]"),
    (0x088 + 0x10 + 41 * 0x10, "PhysicalMemoryBlock.Run[41].BasePage"),
    (0x1058, "reserved"),
    (0x1FFF, "reserved"),
])
def test_header_field_names(offset, name):
    assert header_field_name(DUMP_HEADER64, offset) == name
