"""What the front ends print about their work: the save summary line with its access summary, and
each ``--json`` object with the JSON Schema it follows (docs/cli.rst shows these schemas).

In JSON, addresses and codes are ``0x`` strings (kernel addresses do not fit a double, which many
JSON readers use for numbers); counts, sizes and seconds are numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..location import Option
from ..source import Access

if TYPE_CHECKING:  # the save pipeline is imported only by the commands that save
    from ..plugins import PluginInfo
    from ..save import SaveReport

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def size_text(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.2f} {unit}"
    return f"{count} bytes"


def access_text(access: Access | None) -> str:
    """``from PATH (passed over NAME: why; ...), guest paused N s``: how the source read the guest;
    the pause only when windump itself paused a running guest (a guest found paused stays silent)."""
    if access is None:
        return ""
    text = f"from {access.path}"
    if access.passed_over:
        text += " (passed over " + "; ".join(f"{path}: {why}" for path, why in access.passed_over.items()) + ")"
    if access.paused_seconds:
        text += f", guest paused {access.paused_seconds:.2f} s"
    return text


def summary_line(report: SaveReport) -> str:
    """The one line both front ends print after a save."""
    line = (f"wrote {report.output}: {size_text(report.bytes_written)}, {report.runs} runs, {report.pages} pages, "
            f"{report.seconds:.1f} s, {report.bytes_per_second / 1e6:.0f} MB/s")
    access = access_text(report.access)
    return f"{line}, {access}" if access else line


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def access_object(access: Access | None) -> dict | None:
    if access is None:
        return None
    return {"path": access.path, "passed_over": dict(access.passed_over), "paused_seconds": access.paused_seconds}


def save_object(report: SaveReport) -> dict:
    """``windump save --json``."""
    return {
        "output": report.output,
        "bytes_written": report.bytes_written,
        "runs": report.runs,
        "pages": report.pages,
        "seconds": report.seconds,
        "bytes_per_second": _finite(report.bytes_per_second),
        "format": report.format,
        "contexts": report.contexts,
        "access": access_object(report.access),
    }


def verify_object(path: str, problems: Sequence[str]) -> dict:
    """``windump verify --json``."""
    return {"file": path, "ok": not problems, "problems": list(problems)}


def option_object(option: Option) -> dict:
    return {"name": option.name, "usage": option.usage, "help": option.help, "flag": option.is_flag,
            "default": option.default, "choices": list(option.choices)}


def plugins_object(described: Sequence[PluginInfo]) -> dict:
    """``windump plugins --json``."""
    return {"plugins": [
        {"name": info.name, "distribution": info.dist, "version": info.version, "module": info.module,
         "sources": [{"pattern": kind.pattern, "summary": kind.summary,
                      "options": [option_object(option) for option in kind.options]} for kind in info.kinds]}
        for info in described
    ]}


# -- schemas ------------------------------------------------------------------------------------

def _object(description: str, properties: dict[str, dict]) -> dict:
    """A JSON Schema object that has exactly ``properties``, each required."""
    return {"type": "object", "description": description, "properties": properties,
            "required": list(properties), "additionalProperties": False}


def _string(description: str) -> dict:
    return {"type": "string", "description": description}


def _hex(description: str) -> dict:
    return {"type": "string", "pattern": "^0x[0-9a-f]+$", "description": description}


def _count(description: str) -> dict:
    return {"type": "integer", "minimum": 0, "description": description}


def _or_null(schema: dict) -> dict:
    return {**schema, "type": [schema["type"], "null"]}


ACCESS_SCHEMA = _object("How the source read guest memory (source.Access)", {
    "path": _string("the memory path that served the reads: file, model, procmem, shm, stream, packets ..."),
    "passed_over": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "each faster path that was not used, in the order tried, mapped to why"},
    "paused_seconds": {"type": ["number", "null"], "minimum": 0,
                       "description": "how long windump kept a running guest paused (0 when it found it "
                                      "paused); null for a source with no live guest"},
})

SAVE_SCHEMA = {"$schema": SCHEMA_DIALECT, **_object("windump save --json: the dump written", {
    "output": _string("the dump file"),
    "bytes_written": _count("bytes in the dump, header included"),
    "runs": _count("physical-memory runs in the header"),
    "pages": _count("pages in the runs"),
    "seconds": {"type": "number", "minimum": 0, "description": "the whole save, sync included"},
    "bytes_per_second": {"type": ["number", "null"], "minimum": 0, "description": "bytes_written / seconds"},
    "format": {"enum": ["x64", "x86"], "description": "the dump header's format"},
    "contexts": _count("Windows processors whose CONTEXT holds its vCPU's registers"),
    "access": {"anyOf": [ACCESS_SCHEMA, {"type": "null"}]},
})}

RUN_SCHEMA = _object("one physical-memory run", {
    "BasePage": _count("first page frame number"),
    "PageCount": _count("pages in the run"),
})

INFO_SCHEMA = {"$schema": SCHEMA_DIALECT, **_object(
    "windump info --json: the dump header's fields under their Windows names, and facts of the file", {
        "file": _string("the dump file"),
        "format": {"enum": ["x64", "x86"], "description": "the header layout"},
        "ValidDump": {"enum": ["DU64", "DUMP"], "description": "the signature after PAGE"},
        "MachineImageType": _hex("0x8664 for x64, 0x14c for x86"),
        "MajorVersion": _count("0xf for a free build, 0xc for a checked one"),
        "MinorVersion": _count("the Windows build number"),
        "DumpType": _count("1 full, 2 kernel, 5 bitmap full, 6 bitmap kernel"),
        "dump_kind": {"enum": ["full", "kernel", "bitmap full", "bitmap kernel", "unknown"],
                      "description": "DumpType in words"},
        "DirectoryTableBase": _hex("the kernel's page-table root (CR3)"),
        "KdDebuggerDataBlock": _hex("virtual address of KDBG"),
        "PsLoadedModuleList": _hex("virtual address of the loaded-module list"),
        "BugCheckCode": _hex("the bug-check code"),
        "BugCheckParameters": {"type": "array", "items": _hex("a parameter"), "minItems": 4, "maxItems": 4,
                               "description": "BugCheckParameter1 to 4"},
        "NumberProcessors": _count("processors the dump describes"),
        "SystemTime": _or_null(_string("the dump's time, ISO 8601 UTC; null when not set")),
        "Comment": _string("the header's comment (empty when none)"),
        "file_size": _count("bytes in the file"),
        "RequiredDumpSpace": _count("bytes the header says the dump takes"),
        "runs": {"anyOf": [{"type": "array", "items": RUN_SCHEMA}, {"type": "null"}],
                 "description": "PhysicalMemoryBlock's runs; null when NumberOfRuns does not fit the header"},
        "pages": _or_null(_count("pages in the runs")),
        "runs_problem": _or_null(_string("why the runs cannot be read, when runs is null")),
    })}

VERIFY_SCHEMA = {"$schema": SCHEMA_DIALECT, **_object(
    "windump verify --json: the dump's problems (the exit status is 1 unless ok)", {
        "file": _string("the dump file"),
        "ok": {"type": "boolean", "description": "true when no problem was found"},
        "problems": {"type": "array", "items": {"type": "string"}, "description": "one line per problem"},
    })}

OPTION_SCHEMA = _object("one option of a source's location", {
    "name": _string("the option's one name: ?NAME in a location, --NAME and set windump NAME in gdb"),
    "usage": _string("how it is written: NAME or NAME=VALUE"),
    "help": _string("what it does"),
    "flag": {"type": "boolean", "description": "true when it takes no value"},
    "default": _or_null(_string("the value when absent, as a user writes it; null: none")),
    "choices": {"type": "array", "items": {"type": "string"}, "description": "the only values accepted, if any"},
})

PLUGINS_SCHEMA = {"$schema": SCHEMA_DIALECT, **_object("windump plugins --json: the loaded plugins, by name", {
    "plugins": {"type": "array", "items": _object("one plugin", {
        "name": _string("its entry-point name"),
        "distribution": _or_null(_string("the distribution that installed it; null when registered in-process")),
        "version": _or_null(_string("that distribution's version")),
        "module": _string("the module holding its hooks"),
        "sources": {"type": "array", "items": _object("a source it opens", {
            "pattern": _string("what the user types"),
            "summary": _string("what it opens"),
            "options": {"type": "array", "items": OPTION_SCHEMA},
        })},
    })},
})}
