"""Third-party readers (kdmp-parser, volatility3, memprocfs) asked what they see in a dump, and
pyelftools' view of the QEMU ELF it came from: the independent judges of windump's output.

Each reader runs in a subprocess (this file run as a script, a JSON request on stdin, a JSON answer
on stdout), because kdmp-parser can crash on a damaged file and a judge must not take the test run
down with it. One subprocess per reader reads every address asked for, since importing volatility3
and stacking its layers costs far more than the reads.

memprocfs judges dumps of :data:`MEMPROCFS_MIN_SIZE` and more only (it takes smaller files for
something else): :func:`judges` names the readers that apply to a dump.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from elftools.elf.elffile import ELFFile

PAGE_SIZE = 0x1000
PAGE_MASK = ~(PAGE_SIZE - 1)

#: The header CONTEXT fields kdmp-parser reports (its names, which are winnt.h's).
KDMP_CONTEXT_FIELDS = ("ContextFlags", "MxCsr", "MxCsr2", "SegCs", "SegDs", "SegEs", "SegFs", "SegGs", "SegSs",
                       "EFlags", "Dr0", "Dr1", "Dr2", "Dr3", "Dr6", "Dr7", "Rax", "Rcx", "Rdx", "Rbx", "Rsp",
                       "Rbp", "Rsi", "Rdi", "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15", "Rip")

#: Seconds a reader may take for one dump before the test calls it hung.
READER_TIMEOUT = 120

#: The smallest file memprocfs reads as a crash dump: LeechCore opens a smaller one as something else.
MEMPROCFS_MIN_SIZE = 16 << 20


@dataclass
class Result:
    """What one reader made of one dump.

    ``physical`` maps each page address asked for to the page's bytes (None when the reader has no
    such page); ``translations`` maps each virtual address to its physical address (None when it
    does not translate) and ``virtual`` to the bytes of its page read through the reader's own
    translation. ``errors`` says, per address, why the reader failed on it.

    memprocfs reports no DumpType but what its device layer read from the header: ``kdbg_address``
    (KdDebuggerDataBlock), ``processors`` (NumberProcessors) and ``memory_map``, each run as
    ``[physical base, bytes, offset in the file]``.
    """

    reader: str
    parsed: bool
    reason: str = ""
    dump_type: int | None = None
    directory_table_base: int | None = None
    context: dict[str, int] = field(default_factory=dict)
    bugcheck: list[int] = field(default_factory=list)
    physical: dict[int, bytes | None] = field(default_factory=dict)
    translations: dict[int, int | None] = field(default_factory=dict)
    virtual: dict[int, bytes | None] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    kdbg_address: int | None = None
    processors: int | None = None
    memory_map: list[list[int]] = field(default_factory=list)


def kdmp_read(dump: str | os.PathLike, physical: Sequence[int] = (), virtual: Sequence[int] = ()) -> Result:
    """kdmp-parser's view of ``dump``: header fields, the page at each physical address, and each
    virtual address translated through the header's DirectoryTableBase."""
    return _run("kdmp", {"dump": os.fspath(dump), "physical": list(physical), "virtual": list(virtual)})


def volatility_read(
    dump: str | os.PathLike, physical: Sequence[int] = (), virtual: Sequence[int] = (), dtb: int | None = None
) -> Result:
    """volatility3's view of ``dump`` through its crash-dump layer, with virtual addresses translated
    by its Windows Intel32e layer from ``dtb`` (the header's DirectoryTableBase when None)."""
    request = {"dump": os.fspath(dump), "physical": list(physical), "virtual": list(virtual), "dtb": dtb}
    return _run("volatility", request)


def memprocfs_read(
    dump: str | os.PathLike, physical: Sequence[int] = (), virtual: Sequence[int] = (), dtb: int | None = None
) -> Result:
    """memprocfs's view of ``dump``: what its LeechCore device read from the header, each physical
    page, and each virtual address translated by memprocfs's own x64 paging from ``dtb`` (the
    header's DirectoryTableBase when None). For dumps of :data:`MEMPROCFS_MIN_SIZE` and more."""
    request = {"dump": os.fspath(dump), "physical": list(physical), "virtual": list(virtual), "dtb": dtb}
    return _run("memprocfs", request)


#: Every judge, by the name its Result carries.
READERS: dict[str, Callable[..., Result]] = {
    "kdmp": kdmp_read, "volatility": volatility_read, "memprocfs": memprocfs_read,
}


def judges(dump: str | os.PathLike) -> dict[str, Callable[..., Result]]:
    """The readers that judge ``dump``: all of :data:`READERS`, less memprocfs below its minimum size."""
    small = os.path.getsize(dump) < MEMPROCFS_MIN_SIZE
    return {name: read for name, read in READERS.items() if not (small and name == "memprocfs")}


def _run(reader: str, request: dict) -> Result:
    process = subprocess.run(
        [sys.executable, __file__, reader],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=READER_TIMEOUT,
    )
    if process.returncode != 0 or not process.stdout:
        reason = f"{reader} exited with status {process.returncode}: {process.stderr[-2000:]}"
        return Result(reader, parsed=False, reason=reason)
    answer = json.loads(process.stdout)
    if not answer["parsed"]:
        answer["reason"] += process.stderr[-2000:]
    return Result(
        reader=reader,
        parsed=answer["parsed"],
        reason=answer.get("reason", ""),
        dump_type=answer.get("dump_type"),
        directory_table_base=answer.get("directory_table_base"),
        context=answer.get("context", {}),
        bugcheck=answer.get("bugcheck", []),
        physical=_pages(answer.get("physical", {})),
        translations={int(k): v for k, v in answer.get("translations", {}).items()},
        virtual=_pages(answer.get("virtual", {})),
        errors={int(k): v for k, v in answer.get("errors", {}).items()},
        kdbg_address=answer.get("kdbg_address"),
        processors=answer.get("processors"),
        memory_map=answer.get("memory_map", []),
    )


def _pages(answer: dict[str, str | None]) -> dict[int, bytes | None]:
    return {int(address): None if page is None else base64.b64decode(page) for address, page in answer.items()}


@functools.lru_cache(maxsize=16)
def _elf_loads(elf_path: str, mtime_ns: int) -> list[tuple[int, int, int]]:
    with open(elf_path, "rb") as f:
        return [
            (seg["p_paddr"], seg["p_filesz"], seg["p_offset"])
            for seg in ELFFile(f).iter_segments()
            if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]
        ]


def elf_physical_read(elf_path: str | os.PathLike, pa: int, n: int) -> bytes:
    """``n`` bytes of guest physical memory from ``pa`` as a QEMU ELF holds them, read with pyelftools'
    program headers only, independently of windump's ELF source. Raises LookupError outside them."""
    elf_path = os.fspath(elf_path)
    loads = _elf_loads(elf_path, os.stat(elf_path).st_mtime_ns)
    data = bytearray()
    with open(elf_path, "rb") as f:
        while len(data) < n:
            address = pa + len(data)
            load = next(((p, s, o) for p, s, o in loads if p <= address < p + s), None)
            if load is None:
                raise LookupError(f"{elf_path}: physical address {address:#x} is in no PT_LOAD")
            paddr, filesz, offset = load
            f.seek(offset + address - paddr)
            data += f.read(min(n - len(data), paddr + filesz - address))
    return bytes(data)


# ----- the drivers, run in the subprocess -----


def _page_text(page: bytes | None) -> str | None:
    return None if page is None else base64.b64encode(page).decode()


def _drive_kdmp(request: dict) -> dict:
    from kdmp_parser import _kdmp_parser as kdmp

    parser = kdmp.KernelDumpParser()
    if not parser.Parse(request["dump"]):
        return {"parsed": False, "reason": "kdmp-parser's Parse returned False"}
    context = parser.GetContext()
    bugcheck = parser.GetBugCheckParameters()
    answer = {
        "parsed": True,
        "dump_type": int(parser.GetDumpType().value),
        "directory_table_base": parser.GetDirectoryTableBase(),
        "context": {name: int(getattr(context, name)) for name in KDMP_CONTEXT_FIELDS},
        "bugcheck": [bugcheck.BugCheckCode, *bugcheck.BugCheckCodeParameter],
        "physical": {},
        "translations": {},
        "virtual": {},
        "errors": {},
    }
    for pa in request["physical"]:
        page = parser.GetPhysicalPage(pa & PAGE_MASK)
        answer["physical"][pa] = _page_text(None if page is None else bytes(page))
    for va in request["virtual"]:
        answer["translations"][va] = parser.VirtTranslate(va, 0)
        page = parser.GetVirtualPage(va & PAGE_MASK, 0)
        answer["virtual"][va] = _page_text(None if page is None else bytes(page))
    return answer


def _drive_volatility(request: dict) -> dict:
    from volatility3.framework import contexts, exceptions
    from volatility3.framework.layers import crash, intel, physical

    context = contexts.Context()
    context.config["file.location"] = "file://" + os.path.abspath(request["dump"])
    context.add_layer(physical.FileLayer(context, "file", "file"))
    context.config["crash.base_layer"] = "file"
    try:
        layer = crash.WindowsCrashDump64Layer(context, "crash", "crash")
    except exceptions.LayerException as error:
        return {"parsed": False, "reason": f"volatility3 rejects the dump: {error}"}
    context.add_layer(layer)
    header = layer.get_header()
    answer = {
        "parsed": True,
        "dump_type": layer.dump_type,
        "directory_table_base": layer.dtb,
        "bugcheck": [int(header.BugCheckCode)] + [int(p) for p in header.BugCheckCodeParameter],
        "physical": {},
        "translations": {},
        "virtual": {},
        "errors": {},
    }
    for pa in request["physical"]:
        try:
            answer["physical"][pa] = _page_text(layer.read(pa & PAGE_MASK, PAGE_SIZE))
        except exceptions.InvalidAddressException as error:
            answer["physical"][pa] = None
            answer["errors"][pa] = str(error)
    if request["virtual"]:
        dtb = request["dtb"] if request["dtb"] is not None else layer.dtb
        context.config["kernel.memory_layer"] = "crash"
        context.config["kernel.page_map_offset"] = dtb & PAGE_MASK & ((1 << 63) - 1)
        kernel = intel.WindowsIntel32e(context, "kernel", "kernel")
        context.add_layer(kernel)
        for va in request["virtual"]:
            try:
                answer["translations"][va] = kernel.translate(va)[0]
                answer["virtual"][va] = _page_text(kernel.read(va & PAGE_MASK, PAGE_SIZE))
            except exceptions.InvalidAddressException as error:
                answer["translations"].setdefault(va, None)
                answer["virtual"][va] = None
                answer["errors"][va] = str(error)
    return answer


def _drive_memprocfs(request: dict) -> dict:
    import leechcorepyc
    import memprocfs

    path = request["dump"]
    # Its device layer first: whether it took the file for a crash dump, and what it read from the header.
    device = leechcorepyc.LeechCore("file://" + path)
    try:
        if not device.get_option(leechcorepyc.LC_OPT_MEMORYINFO_VALID):
            return {"parsed": False, "reason": "memprocfs does not take the file for a crash dump "
                                               "(LeechCore's MEMORYINFO_VALID is 0: it reads it as raw memory)"}
        option = {name: device.get_option(getattr(leechcorepyc, f"LC_OPT_MEMORYINFO_{name}"))
                  for name in ("OS_DTB", "OS_KdDebuggerDataBlock", "OS_NUM_PROCESSORS")}
        memory_map = [[run["base"], run["size"], run["offset"]] for run in device.memmap]
    finally:
        device.close()
    answer = {
        "parsed": True,
        "directory_table_base": option["OS_DTB"],
        "kdbg_address": option["OS_KdDebuggerDataBlock"],
        "processors": option["OS_NUM_PROCESSORS"],
        "memory_map": memory_map,
        "physical": {},
        "translations": {},
        "virtual": {},
        "errors": {},
    }
    # With -dtb, memprocfs keeps a process for that page table when it finds no Windows kernel to
    # walk (the model guest has no ntoskrnl image): its virtual reads are memprocfs's own translation.
    dtb = (request["dtb"] if request["dtb"] is not None else option["OS_DTB"]) & PAGE_MASK & ((1 << 63) - 1)
    vmm = memprocfs.Vmm(["-device", path, "-dtb", hex(dtb), "-disable-symbolserver", "-disable-python"])
    try:
        for pa in request["physical"]:
            page = vmm.memory.read(pa & PAGE_MASK, PAGE_SIZE, memprocfs.FLAG_NOCACHE)
            answer["physical"][pa] = _page_text(page) if len(page) == PAGE_SIZE else None
            if len(page) != PAGE_SIZE:
                answer["errors"][pa] = f"memprocfs read {len(page)} bytes of the page"
        if request["virtual"]:
            kernel = next((p for p in vmm.process_list() if p.dtb == dtb), None)
            if kernel is None:
                raise RuntimeError(f"memprocfs has no process with DirectoryTableBase {dtb:#x}")
            for va in request["virtual"]:
                try:
                    answer["translations"][va] = kernel.memory.virt2phys(va)
                except RuntimeError as error:
                    answer["translations"][va] = answer["virtual"][va] = None
                    answer["errors"][va] = str(error)
                    continue
                page = kernel.memory.read(va & PAGE_MASK, PAGE_SIZE, memprocfs.FLAG_NOCACHE)
                answer["virtual"][va] = _page_text(page) if len(page) == PAGE_SIZE else None
    finally:
        vmm.close()
    return answer


def main(reader: str) -> None:
    request = json.load(sys.stdin)
    drive = {"kdmp": _drive_kdmp, "volatility": _drive_volatility, "memprocfs": _drive_memprocfs}[reader]
    # The readers print their complaints on stdout (kdmp-parser from C++): send those to stderr,
    # so that stdout carries the answer alone.
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        answer = drive(request)
    except Exception:  # a reader's own failure is an answer too: report it, do not hide it
        answer = {"parsed": False, "reason": traceback.format_exc()}
    with os.fdopen(answer_fd, "w") as answer_file:
        json.dump(answer, answer_file)


if __name__ == "__main__":
    main(sys.argv[1])
