"""``save`` writes complete dumps: every processor's CONTEXT in the output holds its vCPU's
registers, the header's context and exception record show the chosen vCPU, and the fields the
driver captured at boot are taken fresh; guest memory is never written."""

from __future__ import annotations

import hashlib
import mmap
import struct
import warnings

import numpy as np
import pytest

from windump_plugins import __version__
from windump_plugins.guest import model as guestmodel
from windump_plugins.formats.context import CONTEXT, CONTEXT_ALL_AMD64
from windump_plugins.dumpfile import DumpFile
from windump_plugins.errors import WindumpError
from windump_plugins.formats.dumpheader import DUMP_HEADER64
from windump_plugins.formats.kuser import KUSER_SHARED_DATA
from windump_plugins.fresh import STATUS_BREAKPOINT
from windump_plugins.guest.model import CrashedGuest
from windump_plugins.errors import WindumpWarning
from windump_plugins.paging import AddressSpace
from windump_plugins.save import save
from windump_plugins.source import FileExtent, MemorySource
from windump_plugins.sources.sample import SampleSource
from windump_plugins.verify import verify_dump

RAM = ((0, 0xA0000), (0x100000, 0x700000))
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
PAGE = b"PAGE"


class EditedGuest(SampleSource):
    """The model guest with its published header edited, its vCPUs replaced, or physical bytes changed."""

    def __init__(self, guest: CrashedGuest, *, header_edit=None, cpus=None, patches=None):
        super().__init__(guest, "edited:guest")
        self._cpus = cpus
        self.patches = patches or {}
        header = guest.header
        if header_edit:
            header_edit(header)
        self.note = guest.note[:24] + header.tobytes()

    def vmcoreinfo(self) -> bytes:
        return self.note

    def cpus(self):
        return super().cpus() if self._cpus is None else self._cpus

    def readinto(self, address, buffer):
        super().readinto(address, buffer)
        for at, data in self.patches.items():
            lo, hi = max(at, address), min(at + len(data), address + len(buffer))
            if lo < hi:
                buffer[lo - address:hi - address] = data[lo - at:hi - at]


def saved(tmp_path, source, **options):
    path = tmp_path / "guest.dmp"
    save(source, path, **options)
    return DumpFile(path)


def processor_contexts(dump: DumpFile) -> list[np.void]:
    """Each KiProcessorBlock[i]'s CONTEXT as the dump holds it, for i below NumberProcessors."""
    header = dump.header
    space = AddressSpace(dump, int(header["DirectoryTableBase"]))
    kdbg = int(header["KdDebuggerDataBlock"])
    block = space.read_u64(kdbg + 0x218)
    offset = space.read_u16(kdbg + 0x338)
    contexts = []
    for i in range(int(header["NumberProcessors"])):
        address = space.read_u64(space.read_u64(block + 8 * i) + offset)
        contexts.append(np.frombuffer(space.read(address, CONTEXT.itemsize), dtype=CONTEXT)[0])
    return contexts


def assert_holds_registers(context: np.void, registers: dict[str, int], what: str) -> None:
    """Every register the vCPU has, read field by field against the raw register values."""
    assert int(context["ContextFlags"]) == CONTEXT_ALL_AMD64, what
    assert {n: int(context[n.capitalize()]) for n in GPRS} == {n: registers[n] for n in GPRS}, what
    assert int(context["Rip"]) == registers.get("rip", 0), what
    assert int(context["EFlags"]) == registers["rflags"], what
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        assert int(context[f"Seg{name.capitalize()}"]) == registers[name], what
    for n in (0, 1, 2, 3, 7):
        assert int(context[f"Dr{n}"]) == registers[f"dr{n}"], what
    assert int(context["MxCsr"]) == int(context["FltSave"]["MxCsr"]) == registers["mxcsr"], what
    xmm = context["FltSave"]["XmmRegisters"]
    assert [int(x["Low"]) | int(x["High"]) << 64 for x in xmm] == [registers[f"xmm{i}"] for i in range(16)], what


@pytest.mark.parametrize("cpus, order", [(1, None), (2, None), (4, (2, 3, 1, 0))])
def test_every_processor_context_holds_its_vcpus_registers(tmp_path, cpus, order):
    guest = CrashedGuest(ram=RAM, cpus=cpus, processor_order=order)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dump = saved(tmp_path, SampleSource(guest))
    with dump:
        contexts = processor_contexts(dump)
        assert int(dump.header["NumberProcessors"]) == cpus
        for number, context in enumerate(contexts):
            vcpu = guest.processor_order[number]
            assert_holds_registers(context, guest.cpu_states[vcpu].registers, f"processor {number} (vCPU {vcpu})")
    assert verify_dump(tmp_path / "guest.dmp") == []


def test_body_differs_from_the_guest_only_in_the_contexts(tmp_path):
    guest = CrashedGuest(ram=RAM, cpus=3)
    with saved(tmp_path, SampleSource(guest)) as dump:
        contexts = {guest.virtual_to_physical(a) + i for a in guest.context_addresses for i in range(CONTEXT.itemsize)}
        differs = set()
        for start, end in ((0x100000, 0x700000), (0x1000, 0xA0000)):
            ours = np.frombuffer(dump.read(start, end - start), dtype=np.uint8)
            theirs = np.frombuffer(guest.read(start, end - start), dtype=np.uint8)
            differs |= set((np.flatnonzero(ours != theirs) + start).tolist())
    assert differs <= contexts
    for address in guest.context_addresses:  # each stale context was replaced
        start = guest.virtual_to_physical(address)
        assert differs & set(range(start, start + CONTEXT.itemsize))


@pytest.mark.parametrize("context_cpu", [None, 0, 2])
def test_header_context_and_exception_show_the_chosen_vcpu(tmp_path, context_cpu):
    guest = CrashedGuest(ram=RAM, cpus=3, processor_order=(1, 2, 0))
    registers = dict(guest.cpu_states[context_cpu or 0].registers, rip=0xFFFFF806_52001234)
    cpus = [type(s)(s.index, dict(s.registers)) for s in guest.cpu_states]
    cpus[context_cpu or 0].registers["rip"] = registers["rip"]
    with saved(tmp_path, EditedGuest(guest, cpus=cpus), context_cpu=context_cpu) as dump:
        header = dump.header
    record = header["ContextRecord"].tobytes()
    assert_holds_registers(np.frombuffer(record[:CONTEXT.itemsize], dtype=CONTEXT)[0], registers, "header")
    assert record[CONTEXT.itemsize:] == bytes(len(record) - CONTEXT.itemsize)
    exception = header["Exception"]
    assert int(exception["ExceptionCode"]) == STATUS_BREAKPOINT == 0x80000003
    assert int(exception["ExceptionAddress"]) == registers["rip"]
    assert int(exception["NumberParameters"]) == 1
    assert exception.tobytes()[0x04:0x10] == bytes(12)  # no flags, no nested record
    assert exception.tobytes()[0x1C:] == bytes(0x98 - 0x1C)  # ExceptionInformation[0] = 0 and the rest


@pytest.mark.parametrize("context_cpu", [3, -1])
def test_context_cpu_must_name_a_vcpu(tmp_path, context_cpu):
    guest = CrashedGuest(ram=RAM, cpus=3)
    with pytest.raises(WindumpError, match=f"the header context cannot show vCPU {context_cpu}: edited:guest has "
                                           f"vCPUs 0-2"):
        save(EditedGuest(guest), tmp_path / "guest.dmp", context_cpu=context_cpu)
    assert list(tmp_path.iterdir()) == []


def test_fresh_time_uptime_comment_and_no_filler(tmp_path):
    guest = CrashedGuest(ram=RAM, cpus=2)
    published = guest.header
    assert int(published["SystemTime"]) != guestmodel.SYSTEM_TIME  # stale: captured at boot
    with saved(tmp_path, SampleSource(guest, "sample:cpus=2")) as dump:
        header = dump.header
    assert int(header["SystemTime"]) == guestmodel.SYSTEM_TIME
    assert int(header["SystemUpTime"]) == guestmodel.INTERRUPT_TIME
    comment = f"windump {__version__} from sample:cpus=2".encode()
    assert header["Comment"].tobytes() == comment.ljust(128, b"\0")
    assert int(header["ProductType"]) == guestmodel.NT_PRODUCT_WIN_NT
    assert int(header["SuiteMask"]) == guestmodel.SUITE_MASK
    for name in ("MiniDumpFields", "SecondaryDataState", "WriterStatus", "Attributes", "BootId"):
        assert PAGE in published[name].tobytes() and int(header[name]) == 0, name
    raw = header.tobytes()
    assert raw[0x104C:0x1050] == bytes(4)
    for name in ("Exception", "ContextRecord", "Comment", "SystemTime", "SystemUpTime", "NumberProcessors"):
        start = DUMP_HEADER64.fields[name][1]
        assert PAGE not in raw[start:start + DUMP_HEADER64.fields[name][0].itemsize], name


def test_guest_values_are_kept_where_the_guest_set_them(tmp_path):
    def edit(header):
        header["ProductType"], header["SuiteMask"], header["BootId"] = 3, 0x12, 7

    with saved(tmp_path, EditedGuest(CrashedGuest(ram=RAM, cpus=1), header_edit=edit)) as dump:
        assert (int(dump.header["ProductType"]), int(dump.header["SuiteMask"]), int(dump.header["BootId"])) == (3, 0x12, 7)


def _kuser_time(guest: CrashedGuest, offset: int, low: int, high1: int, high2: int) -> dict[int, bytes]:
    return {guest.virtual_to_physical(KUSER_SHARED_DATA + offset): struct.pack("<III", low, high1, high2)}


def test_a_torn_system_time_keeps_the_boot_time_with_a_warning(tmp_path):
    guest = CrashedGuest(ram=RAM, cpus=1)
    source = EditedGuest(guest, patches=_kuser_time(guest, 0x14, 5, 0x01DA3C00, 0x01DA3C01))
    with pytest.warns(WindumpWarning, match=r"KUSER_SHARED_DATA.SystemTime is not readable .*High1Time 0x1da3c00 "
                                            r"and High2Time 0x1da3c01 still disagree"):
        dump = saved(tmp_path, source)
    with dump:
        assert int(dump.header["SystemTime"]) == int(guest.header["SystemTime"])
        assert int(dump.header["SystemUpTime"]) == guestmodel.INTERRUPT_TIME


def test_a_time_torn_once_is_read_again(tmp_path, monkeypatch):
    """A live guest's clock caught mid-update reads consistent on a later try."""
    guest = CrashedGuest(ram=RAM, cpus=1)
    torn = _kuser_time(guest, 0x08, 0xFFFFFFFF, 2, 1)
    source = EditedGuest(guest, patches=dict(torn))
    address = next(iter(torn))
    real = source.readinto

    def heal(at, buffer):  # the kernel finishes its update after the first read
        real(at, buffer)
        if at <= address < at + len(buffer):
            source.patches.clear()

    monkeypatch.setattr(source, "readinto", heal)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with saved(tmp_path, source) as dump:
            assert int(dump.header["SystemUpTime"]) == guestmodel.INTERRUPT_TIME


def test_number_processors_is_what_kiprocessorblock_lists_now(tmp_path):
    """A header captured with fewer processors (one hot-added later): all four are found and shown."""
    guest = CrashedGuest(ram=RAM, cpus=4)

    def boot_count(header):
        header["NumberProcessors"] = 2

    with saved(tmp_path, EditedGuest(guest, header_edit=boot_count)) as dump:
        assert int(dump.header["NumberProcessors"]) == 4
        assert len(processor_contexts(dump)) == 4


def test_no_cpu_state_warns_and_writes_no_context(tmp_path):
    guest = CrashedGuest(ram=RAM, cpus=2)
    with pytest.warns(WindumpWarning, match="edited:guest gives no vCPU registers: no processor CONTEXT is written"):
        dump = saved(tmp_path, EditedGuest(guest, cpus=[]))
    with dump:
        for vcpu, address in enumerate(guest.context_addresses):
            physical = guest.virtual_to_physical(address)
            assert dump.read(physical, CONTEXT.itemsize) == guest.read(physical, CONTEXT.itemsize)
        assert dump.header["ContextRecord"].tobytes() == guest.header["ContextRecord"].tobytes()
        assert int(dump.header["NumberProcessors"]) == 2
        assert PAGE not in dump.header["Exception"].tobytes()


class SharedRamGuest(MemorySource):
    """The model guest with its RAM in a file mapped shared and writable, as QEMU holds a
    ``memory-backend-file,share=on``, handing windump views of that RAM wherever the source
    interface lets a source give bytes: ``read`` and ``vmcoreinfo`` (the note lies in guest RAM)
    return writable views of the mapping, ``file_extents`` names the RAM file, which is open for
    writing. So whatever windump wrote into what it was given, or through the file, would land in
    guest RAM."""

    def __init__(self, guest: CrashedGuest, path, *, extents: bool):
        self.guest, self.extents, self.description = guest, extents, "shared:ram"
        size = int(guest.ram[-1, 1])
        self.file = open(path, "w+b")
        self.file.truncate(size)
        self.mapping = mmap.mmap(self.file.fileno(), size)  # MAP_SHARED, readable and writable
        self.view = memoryview(self.mapping)
        for start, end in guest.ram.tolist():
            guest.readinto(start, self.view[start:end])

    @property
    def ram(self):
        return self.guest.ram

    def readinto(self, address, buffer):
        self.check_range(address, len(buffer))
        buffer[:] = self.view[address:address + len(buffer)]

    def read(self, address, length):
        self.check_range(address, length)
        return self.view[address:address + length]

    def file_extents(self, address, length):
        self.check_range(address, length)
        return [FileExtent(self.file, address, length)] if self.extents else None

    def vmcoreinfo(self):
        address = self.guest.note_address
        return self.view[address:address + len(self.guest.note)]

    def cpus(self):
        return self.guest.cpu_states

    def digest(self) -> bytes:
        return hashlib.sha256(self.view).digest()

    def close(self):
        self.view.release()
        self.mapping.close()
        self.file.close()


@pytest.mark.parametrize("extents", [False, True], ids=["reads", "file-extents"])
def test_guest_memory_is_never_written(tmp_path, extents):
    """Guest RAM that windump could write through every way a source hands it bytes (views of RAM,
    the RAM file) is byte-identical after the dump, whose processor CONTEXTs hold the vCPUs'
    registers and whose header is the patched one: the patches went to the output only."""
    guest = CrashedGuest(ram=RAM, cpus=2, processor_order=(1, 0))
    with SharedRamGuest(guest, tmp_path / "ram", extents=extents) as source:
        before = source.digest()
        save(source, tmp_path / "guest.dmp")
        assert source.digest() == before, "guest RAM changed"
        note = bytes(source.vmcoreinfo())
    assert note == guest.note
    ram = (tmp_path / "ram").read_bytes()
    for start, end in guest.ram.tolist():  # and it is still the model's RAM
        assert ram[start:end] == guest.read(start, end - start)
    with DumpFile(tmp_path / "guest.dmp") as dump:
        assert dump.header.tobytes() != guest.header.tobytes()
        for number, context in enumerate(processor_contexts(dump)):
            assert_holds_registers(context, guest.cpu_states[guest.processor_order[number]].registers,
                                   f"processor {number}")
