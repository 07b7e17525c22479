"""prepare_header: QEMU 7.2's checks and patches of the guest's published header, on hand-built guests
and on the shared CrashedGuest model."""

import dataclasses
import struct
import warnings

import numpy as np
import pytest
from test_paging import KERNEL, KIB4, MIB2, FakeMemory, PageTables

from windump_plugins.formats import dumpheader as fmt
from windump_plugins.errors import FormatError, WindumpError
from windump_plugins.guest.model import BUGCHECK_PARAMETERS, CrashedGuest
from windump_plugins.headers.choice import choose_header
from windump_plugins.headers.published import NO_NOTE_MESSAGE, prepare_header
from windump_plugins.hookcalls import HookFailure
from windump_plugins.hookspecs import HeaderCandidate
from windump_plugins.errors import WindumpWarning
from windump_plugins.formats.kdbg import KDDEBUGGER_DATA64, encode_kdbg
from windump_plugins.sources.sample import SampleSource

RAM_SIZE = 0x400000
KDBG = KERNEL + 0x1000  # the kernel's (maybe encoded) KdDebuggerDataBlock
KDBG_COPY = KERNEL + 0x5000  # the driver's decoded copy
MM_PFN_DATABASE = KERNEL + 0x7000  # address of nt!MmPfnDatabase
KI_BUGCHECK_DATA = KERNEL + 0x8000
UNMAPPED = KERNEL + 0x1000_0000
LONE_PAGE = KERNEL + 0x4000_0000  # one 4 KiB page, the next one unmapped
BUGCHECK = [0xDEAD_0000_0000_00D1, 0x11, 0x22, 0x33, 0x44]
# Table pages as PageTables allocates them for the fixture's two mappings.
PML4, PD_KERNEL, PT_LONE = 0x10000, 0x12000, 0x14000
WAIT_NEVER, WAIT_ALWAYS, KDP_DATA_BLOCK_ENCODED = 0x5A3C96F01E2D4B87, 0x0123456789ABCDEF, KERNEL + 0x9040


class PublishingGuest(FakeMemory):
    """FakeMemory whose guest published ``note`` through the vmcoreinfo device."""

    def __init__(self):
        super().__init__(RAM_SIZE)
        self.note: bytes | None = None

    def vmcoreinfo(self):
        return self.note

    def write(self, physical: int, data: bytes) -> None:
        self.memory[physical:physical + len(data)] = data


def note_of(header_bytes: bytes) -> bytes:
    """The VMCOREINFO ELF note: namesz, descsz, type, the padded name, then the header."""
    return struct.pack("<III12s", 11, len(header_bytes), 0, b"VMCOREINFO") + header_bytes


def kdbg_bytes(owner_tag: bytes = b"KDBG") -> bytes:
    kdbg = np.zeros((), dtype=KDDEBUGGER_DATA64)
    kdbg["OwnerTag"] = owner_tag
    kdbg["Size"] = KDDEBUGGER_DATA64.itemsize
    kdbg["MmPfnDatabase"] = MM_PFN_DATABASE
    kdbg["KiBugcheckData"] = KI_BUGCHECK_DATA
    return kdbg.tobytes()


@pytest.fixture
def guest():
    """A kernel 2 MiB page at KERNEL -> 0x200000 holding KDBG and KiBugCheckData, and the header
    the driver published at boot: runs covering all RAM, stale bug-check fields, "PAGE" in pads."""
    guest = PublishingGuest()
    tables = PageTables(guest)
    tables.map(KERNEL, 0x200000, MIB2)
    tables.map(LONE_PAGE, 0x100000)
    guest.tables = tables
    assert (tables.pml4, tables.next_table) == (PML4, PT_LONE + KIB4)
    guest.write(0x201000, kdbg_bytes())
    guest.write(0x208000, np.array(BUGCHECK, dtype="<u8").tobytes())

    header = fmt.new_header(fmt.X64)
    header["DirectoryTableBase"] = tables.pml4 | 0x2
    header["KdDebuggerDataBlock"] = KDBG
    header["PfnDatabase"] = 0x5045_4741_5045_4741
    header["BugCheckParameter1"] = KDBG_COPY
    header["NumberProcessors"] = 2
    header["PhysicalMemoryBlock"]["Unused"] = 0x45474150
    header["DumpTypePad"] = 0x45474150
    header["DumpType"] = fmt.DUMP_TYPE_FULL
    fmt.set_header_runs(header, [[0, 0x9F], [0x100, 0x300]])
    guest.header = header
    guest.note = note_of(fmt.header_bytes(header))
    return guest


def publish(guest: PublishingGuest) -> None:
    guest.note = note_of(fmt.header_bytes(guest.header))


def prepare(guest: PublishingGuest) -> HeaderCandidate:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return prepare_header(guest)


PATCHED = {"RequiredDumpSpace", "DumpTypePad", "PfnDatabase", "BugCheckCode", "BugCheckCodePad",
           "BugCheckParameter1", "BugCheckParameter2", "BugCheckParameter3", "BugCheckParameter4",
           "KdDebuggerDataBlock", "PhysicalMemoryBlock"}


def test_patches_the_header_as_qemu_does(guest):
    ram_before = bytes(guest.memory)
    prepared = prepare(guest)
    header = prepared.header
    assert prepared.format is fmt.X64
    assert prepared.kdbg_address == KDBG
    assert int(header["KdDebuggerDataBlock"]) == KDBG
    assert int(header["RequiredDumpSpace"]) == 0x2000 + (0x9F + 0x300) * 0x1000
    assert int(header["PhysicalMemoryBlock"]["Unused"]) == 0
    assert int(header["DumpTypePad"]) == 0
    assert int(header["PfnDatabase"]) == MM_PFN_DATABASE  # the variable's address, as QEMU copies it
    # QEMU copies KiBugCheckData's 40 bytes over BugCheckCode, its pad and the four parameters.
    assert int(header["BugCheckCode"]) == 0xD1
    assert int(header["BugCheckCodePad"]) == 0xDEAD0000
    assert [int(header[f"BugCheckParameter{n}"]) for n in range(1, 5)] == BUGCHECK[1:]
    assert prepared.runs.tolist() == [[0, 0x9F], [0x100, 0x300]]
    assert prepared.address_space.directory_table_base == guest.tables.pml4
    # Everything else is the guest's header, byte for byte; the guest's memory is untouched.
    for name in fmt.DUMP_HEADER64.names:
        if name not in PATCHED:
            assert header[name].tobytes() == guest.header[name].tobytes(), name
    assert header["PhysicalMemoryBlock"]["Run"].tobytes() == guest.header["PhysicalMemoryBlock"]["Run"].tobytes()
    assert bytes(guest.memory) == ram_before


def test_bug_check_code_zero_becomes_live_system_dump(guest):
    guest.write(0x208000, np.array([0, 1, 2, 3, 4], dtype="<u8").tobytes())
    header = prepare(guest).header
    assert int(header["BugCheckCode"]) == fmt.LIVE_SYSTEM_DUMP == 0x161
    assert [int(header[f"BugCheckParameter{n}"]) for n in range(1, 5)] == [1, 2, 3, 4]


def test_encoded_kdbg_falls_back_to_the_drivers_decoded_copy(guest):
    plain = kdbg_bytes()
    guest.write(0x201000, encode_kdbg(plain, WAIT_NEVER, WAIT_ALWAYS, KDP_DATA_BLOCK_ENCODED))
    guest.write(0x205000, plain)
    prepared = prepare(guest)
    assert prepared.kdbg_address == KDBG_COPY
    assert int(prepared.header["KdDebuggerDataBlock"]) == KDBG_COPY
    assert int(prepared.header["PfnDatabase"]) == MM_PFN_DATABASE
    # The bug-check data replaces BugCheckParameter1, which held the copy's address.
    assert int(prepared.header["BugCheckParameter1"]) == BUGCHECK[1]


def test_unreadable_kdbg_falls_back_to_the_drivers_decoded_copy(guest):
    guest.header["KdDebuggerDataBlock"] = UNMAPPED
    publish(guest)
    guest.write(0x205000, kdbg_bytes())
    assert prepare(guest).kdbg_address == KDBG_COPY


def test_no_readable_kdbg_is_an_error(guest):
    encoded = encode_kdbg(kdbg_bytes(), WAIT_NEVER, WAIT_ALWAYS, KDP_DATA_BLOCK_ENCODED)
    guest.write(0x201000, encoded)
    tag = encoded[0x10:0x14]
    with pytest.raises(WindumpError) as error:
        prepare_header(guest)
    assert str(error.value) == (
        f"no KDBG block: KdDebuggerDataBlock {KDBG:#x} (OwnerTag reads {tag!r}) seems to be encrypted, and "
        f"BugCheckParameter1 {KDBG_COPY:#x} (OwnerTag reads b'\\x00\\x00\\x00\\x00') holds no decoded copy"
    )


def test_unreadable_kdbg_and_copy_is_an_error(guest):
    guest.header["KdDebuggerDataBlock"] = UNMAPPED
    guest.header["BugCheckParameter1"] = 0
    publish(guest)
    with pytest.raises(WindumpError) as error:
        prepare_header(guest)
    assert str(error.value) == (
        f"no KDBG block: KdDebuggerDataBlock {UNMAPPED:#x} (OwnerTag is unreadable: virtual address "
        f"{UNMAPPED + 0x10:#x} does not translate: its PD entry 0x0 at physical {PD_KERNEL + 0x80 * 8:#x} "
        "is not present) seems to be encrypted, and BugCheckParameter1 0x0 (OwnerTag is unreadable: virtual address "
        f"0x10 does not translate: its PML4 entry 0x0 at physical {PML4:#x} is not present) holds no decoded copy"
    )


def test_failed_reads_of_pfn_database_and_bug_check_data_only_warn(guest):
    # KDBG at the end of a lone page: its OwnerTag reads, KDBG + 0x88 and + 0xC0 do not.
    kdbg = LONE_PAGE + KIB4 - 0x20
    guest.write(0x100000 + KIB4 - 0x20, kdbg_bytes()[:0x20])
    guest.header["KdDebuggerDataBlock"] = kdbg
    publish(guest)
    with pytest.warns(WindumpWarning) as record:
        prepared = prepare_header(guest)
    def fault(address):
        return (f"virtual address {address:#x} does not translate: "
                f"its PT entry 0x0 at physical {PT_LONE + 8:#x} is not present")

    assert [str(w.message) for w in record] == [
        f"win-dump: failed to read MmPfnDatabase at KDBG + 0xc0 ({fault(kdbg + 0xC0)}); "
        "PfnDatabase keeps the guest's 0x5045474150454741",
        f"win-dump: failed to read KiBugcheckData at KDBG + 0x88 ({fault(kdbg + 0x88)}); "
        "the bug-check code and parameters keep the guest's values",
    ]
    header = prepared.header
    assert int(header["PfnDatabase"]) == 0x5045474150454741
    assert int(header["BugCheckCode"]) == 0 and int(header["BugCheckParameter1"]) == KDBG_COPY
    # The rest of QEMU's patching still happened.
    assert int(header["RequiredDumpSpace"]) == 0x2000 + 0x39F * 0x1000
    assert int(header["DumpTypePad"]) == 0


def test_unreadable_bug_check_data_keeps_the_guests_values(guest):
    kdbg = np.frombuffer(kdbg_bytes(), dtype=KDDEBUGGER_DATA64).copy().reshape(())
    kdbg["KiBugcheckData"] = UNMAPPED
    guest.write(0x201000, kdbg.tobytes())
    with pytest.warns(WindumpWarning) as record:
        header = prepare_header(guest).header
    assert len(record) == 1
    assert str(record[0].message) == (
        f"win-dump: failed to read bugcheck data at KiBugcheckData {UNMAPPED:#x} (virtual address {UNMAPPED:#x} "
        f"does not translate: its PD entry 0x0 at physical {PD_KERNEL + 0x80 * 8:#x} is not present); "
        "the bug-check code and parameters keep the guest's values"
    )
    # As in QEMU: no bug-check data read, so no LIVE_SYSTEM_DUMP either.
    assert int(header["BugCheckCode"]) == 0
    assert int(header["PfnDatabase"]) == MM_PFN_DATABASE


def test_no_note_is_an_error_that_says_how_to_publish_one(guest):
    guest.note = None
    with pytest.raises(WindumpError) as error:
        prepare_header(guest)
    assert str(error.value) == (
        "the guest published no VMCOREINFO note: is `-device vmcoreinfo` on the QEMU command line and the "
        "fwcfg driver running in the guest? (see docs: QEMU set-up)"
    )


@pytest.mark.parametrize("size", [0, 24, 0x2017, 0x2019, 0x1000])
def test_note_size_must_be_a_header_and_its_note_header(guest, size):
    guest.note = (guest.note * 2)[:size]
    with pytest.raises(FormatError) as error:
        prepare_header(guest)
    assert str(error.value) == (
        f"win-dump: invalid vmcoreinfo note size: the guest's note is {size:#x} bytes, "
        "expected 0x2018 (x64) or 0x1018 (x86)"
    )


def test_note_size_must_match_the_header_magic(guest):
    guest.note = guest.note[:0x1018]
    with pytest.raises(FormatError) as error:
        prepare_header(guest)
    assert str(error.value) == "the VMCOREINFO note holds a PAGE/DU64 dump header but is 0x1018 bytes, expected 0x2018"


@pytest.mark.parametrize(("magic", "message"), [
    (b"PAGEDU32", "not a Windows dump header: ValidDump b'DU32', expected b'DU64' or b'DUMP'"),
    (b"EGAPDU64", "not a Windows dump header: signature b'EGAP', expected b'PAGE'"),
])
def test_header_magic_is_checked(guest, magic, message):
    guest.note = guest.note[:24] + magic + guest.note[32:]
    with pytest.raises(FormatError) as error:
        prepare_header(guest)
    assert str(error.value) == message


def test_32_bit_headers_are_parsed_then_refused(guest):
    guest.note = note_of(fmt.header_bytes(fmt.new_header(fmt.X86)))
    with pytest.raises(WindumpError) as error:
        prepare_header(guest)
    assert str(error.value) == (
        "32-bit guests are not supported yet: the VMCOREINFO note holds a PAGE/DUMP dump header"
    )


def test_runs_outside_ram_are_refused(guest):
    fmt.set_header_runs(guest.header, [[0, 0x9F], [0x100, 0x301]])
    publish(guest)
    with pytest.raises(WindumpError) as error:
        prepare_header(guest)
    assert str(error.value) == (
        "run 1 (pages 0x100-0x400, bytes 0x100000-0x400fff) runs past the end of RAM range 0x0-0x3fffff "
        "(QEMU would write zero pages there)"
    )


def test_number_of_pages_must_match_the_runs(guest):
    guest.header["PhysicalMemoryBlock"]["NumberOfPages"] = 0x400
    publish(guest)
    with pytest.raises(FormatError) as error:
        prepare_header(guest)
    assert str(error.value) == "PhysicalMemoryBlock.NumberOfPages is 0x400 but its runs hold 0x39f pages"


# -- the shared model of a crashed guest --------------------------------------------------------

def sample(**options) -> tuple[CrashedGuest, SampleSource]:
    guest = CrashedGuest(**options)
    return guest, SampleSource(guest)


def test_crashed_guest_header_is_patched_as_qemu_does():
    guest, source = sample()
    published = guest.header
    assert int(published["DumpTypePad"]) != 0 and int(published["PhysicalMemoryBlock"]["Unused"]) != 0
    prepared = prepare(source)
    header = prepared.header
    assert prepared.kdbg_address == guest.kdbg_address == int(header["KdDebuggerDataBlock"])
    assert int(header["PfnDatabase"]) == guest.mm_pfn_database
    assert int(header["BugCheckCode"]) == 0xE2
    assert [int(header[f"BugCheckParameter{n}"]) for n in range(1, 5)] == list(BUGCHECK_PARAMETERS)
    runs = guest.windows_runs()
    assert prepared.runs.tolist() == runs.tolist()
    assert int(header["RequiredDumpSpace"]) == 0x2000 + int(runs[:, 1].sum()) * 0x1000
    assert int(header["DumpTypePad"]) == 0 and int(header["PhysicalMemoryBlock"]["Unused"]) == 0
    assert header["ContextRecord"].tobytes() == published["ContextRecord"].tobytes()  # contexts: not here
    assert prepared.address_space.directory_table_base == guest.directory_table_base


def test_crashed_guest_with_encoded_kdbg_uses_the_decoded_copy():
    guest, source = sample(encoded_kdbg=True)
    prepared = prepare(source)
    assert prepared.kdbg_address == guest.decoded_kdbg_address != guest.kdbg_address
    assert int(prepared.header["KdDebuggerDataBlock"]) == guest.decoded_kdbg_address
    assert int(prepared.header["PfnDatabase"]) == guest.mm_pfn_database
    assert int(prepared.header["BugCheckParameter1"]) == BUGCHECK_PARAMETERS[0]


def test_crashed_guest_without_bug_check_is_a_live_system_dump():
    _, source = sample(bugcheck_code=0)
    header = prepare(source).header
    assert int(header["BugCheckCode"]) == 0x161
    assert [int(header[f"BugCheckParameter{n}"]) for n in range(1, 5)] == [0, 0, 0, 0]


# -- choosing among the candidates of several header methods -----------------------------------------


def test_candidates_are_chosen_by_method_in_the_declared_order(guest):
    published = prepare(guest)
    symbols = dataclasses.replace(published, method="symbols")
    vendor = dataclasses.replace(published, method="vendor")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # they agree: nothing to say
        assert choose_header([vendor, symbols, published], [], "guest") is published
        assert choose_header([vendor, symbols], [], "guest") is symbols
        assert choose_header([vendor], [], "guest") is vendor


def test_with_no_candidate_the_most_trusted_method_s_failure_is_raised(guest):
    failures = [HookFailure("vendor", WindumpError("vendor: no idea")),
                HookFailure("symbols", WindumpError("symbols: no kernel found")),
                HookFailure("published", WindumpError(NO_NOTE_MESSAGE))]
    with pytest.raises(WindumpError) as error:
        choose_header([], failures, "guest")
    assert str(error.value) == NO_NOTE_MESSAGE
    with pytest.raises(WindumpError, match="^symbols: no kernel found$"):
        choose_header([], failures[:2], "guest")
    with pytest.raises(WindumpError, match=r"^no plugin builds a dump header for guest \(windump plugins lists"):
        choose_header([], [], "guest")


def test_disagreeing_runs_and_formats_are_named(guest):
    published = prepare(guest)
    fewer = dataclasses.replace(published, method="symbols", runs=published.runs[:1])
    x86 = dataclasses.replace(published, method="vendor", format=fmt.X86)
    with pytest.warns(WindumpWarning) as caught:
        choose_header([x86, fewer, published], [], "guest")
    assert [str(warning.message) for warning in caught] == [
        "the symbols header disagrees with the published one the dump uses: 1 runs of 0x9f pages "
        "(published: 2 runs of 0x39f)",
        "the vendor header disagrees with the published one the dump uses: the header format x86 (published: x64)",
    ]
