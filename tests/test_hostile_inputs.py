"""The bad-input corpus through the command line and the wire parsers: every damaged file gives its
exact ``windump: error:`` line, exit status 1 and no file, temporary or final; every hostile gdbstub
reply and QMP conversation gives one SourceError line."""

from __future__ import annotations

import re

import pytest

from corpus import BUILT_IN_PLUGINS
from corpus.files import BAD_DUMPS, BadFile, bad_files
from corpus.wire import BAD_QMP, BAD_REPLIES, ScriptedQmp, ScriptedStub
from windump_plugins.frontends import cli
from windump_plugins.errors import SourceError, WindumpError
from windump_plugins.live.rsp import RemoteStub
from windump_plugins.sources.qmp import QmpSource

CASES = bad_files()
#: One case per parser family, also run as a real ``windump`` process.
PROCESS_CASES = ("ELF class 3", "note claims 4 GiB", "32-bit guest", "runs overlap", "info: a directory")


@pytest.fixture
def inline_windump(tmp_path, monkeypatch, capsys):
    """``windump ARGS`` run in-process in ``tmp_path`` with the built-in plugins: (status, stdout, stderr)."""
    monkeypatch.delenv("WINDUMP_DISABLE_PLUGINS", raising=False)
    monkeypatch.setenv("WINDUMP_PLUGINS", BUILT_IN_PLUGINS)
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> tuple[int, str, str]:
        status = cli.main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return run


def _prepare(case: BadFile, tmp_path) -> tuple[list[str], str, set[str]]:
    name = "bad.input"
    case.make(tmp_path / name)
    argv = [arg.format(path=name) for arg in case.argv]
    return argv, case.message.format(path=name), {p.name for p in tmp_path.iterdir()}


def _check(case: BadFile, status: int, out: str, err: str, expected: str, tmp_path, before: set[str]) -> None:
    assert status == 1, (out, err)
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    line = err[:-1]
    if case.prefix:
        assert line.startswith(f"windump: error: {expected}"), line
    else:
        assert line == f"windump: error: {expected}"
    assert {p.name for p in tmp_path.iterdir()} == before, "a file was left behind"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_file_gives_its_one_line_error(case, inline_windump, tmp_path):
    argv, expected, before = _prepare(case, tmp_path)
    status, out, err = inline_windump(*argv)
    _check(case, status, out, err, expected, tmp_path, before)


@pytest.mark.parametrize("name", PROCESS_CASES)
def test_bad_file_through_a_real_process(name, run_windump, tmp_path):
    case = next(case for case in CASES if case.name == name)
    argv, expected, before = _prepare(case, tmp_path)
    result = run_windump(*argv)
    assert "Traceback" not in result.stderr
    _check(case, result.returncode, result.stdout, result.stderr, expected, tmp_path, before)


def test_corpus_covers_every_parser():
    names = " ".join(case.name for case in CASES)
    assert len(CASES) >= 50
    for word in ("ELF", "PT_NOTE", "note", "QEMU CPU state", "prstatus", "VMCOREINFO", "ValidDump", "run",
                 "NumberOfRuns", "KDBG", "info:"):
        assert word in names, word


@pytest.mark.parametrize("name", BAD_DUMPS, ids=list(BAD_DUMPS))
def test_verify_lists_the_damage_and_info_still_describes(name, inline_windump, tmp_path):
    make, problem = BAD_DUMPS[name]
    make(tmp_path / "bad.dmp")
    status, out, err = inline_windump("verify", "bad.dmp")
    assert (status, err) == (1, "")
    lines = out.splitlines()
    assert all(line.startswith("bad.dmp: ") for line in lines)
    assert f"bad.dmp: {problem}" in lines, out
    status, out, err = inline_windump("info", "bad.dmp")
    assert (status, err) == (0, ""), err
    assert re.search(r"^format +x64 \(PAGEDU64\)", out, re.M)


#: Locations whose options try to break the one-line rule or the value checks, and what is refused.
HOSTILE_OPTIONS = {
    "sample:?cpus=1%0a2": "bad option value cpus='1\\n2': expected a whole number",
    "sample:?cpus=%ff": "bad option value cpus='\ufffd': expected a whole number",
    "sample:?%00": "unknown option '\\x00'; the options are cpus=N, encoded, ram=SIZE, bugcheck=CODE",
    "sample:?=": "unknown option ''",
    "sample:?cpus=99999999999999999999": "the model has 1 to 8 vCPUs, not 99999999999999999999",
    "sample:?bugcheck=0x1ffffffff": "bad option value bugcheck='0x1ffffffff': a bug-check code is 32 bits",
    "sample:?ram=-5M": "bad option value ram='-5M'",
    "sample:?encoded&encoded": "option 'encoded' is given twice",
    "sample:?" + "&" * 100000 + "cpus=x": "bad option value cpus='x'",
    "gdb://127.0.0.1:1?timeout=1e999": "bad option value timeout='1e999': expected a number of seconds above 0",
    "gdb://127.0.0.1:1?timeout=-1": "bad option value timeout='-1'",
    "gdb://127.0.0.1:1?header-pa=0x-1": "bad option value header-pa='0x-1': expected a physical address",
    "gdb://127.0.0.1:1?keep-stopped=%0a": "option 'keep-stopped' takes no value: write ?keep-stopped",
    "qmp:x.sock?memory=": "memory='' is none of shm, procmem, stream",
    "qmp:x.sock?memory=shm%0a": "memory='shm\\n' is none of shm, procmem, stream",
}


@pytest.mark.parametrize("location", list(HOSTILE_OPTIONS), ids=lambda location: location[:48])
def test_hostile_location_options_are_one_line(location, inline_windump, tmp_path):
    status, out, err = inline_windump("save", location, "out.dmp")
    assert (status, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith(f"windump: error: {location}: "), err[:200]
    assert HOSTILE_OPTIONS[location] in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", BAD_REPLIES, ids=[case.name for case in BAD_REPLIES])
def test_hostile_gdbstub_reply_is_one_source_error(case):
    stub = ScriptedStub(case.supported, case.reply)
    try:
        with pytest.raises(WindumpError) as caught:
            host, port = stub.address.split(":")
            with RemoteStub(host, int(port), timeout=5) as remote:
                case.operation(remote)
        assert type(caught.value) is SourceError
        assert str(caught.value) == case.message.format(address=stub.address)
    finally:
        stub.close()


@pytest.mark.parametrize("case", BAD_QMP, ids=[case.name for case in BAD_QMP])
def test_hostile_qmp_peer_is_one_source_error(case, tmp_path):
    path = str(tmp_path / "qmp.sock")
    peer = ScriptedQmp(path, case)
    try:
        with pytest.raises(WindumpError) as caught:
            QmpSource(path, timeout=1).close()
        assert type(caught.value) is SourceError
        message = str(caught.value)
        assert "\n" not in message
        expected = case.message.format(path=path)
        assert message.startswith(expected) if case.prefix else message == expected
        assert tuple(peer.commands[1:1 + len(case.sent)]) == case.sent or not case.sent
    finally:
        peer.close()
