"""The ``windump`` command line end to end: a sample guest to a verified dump, and every bad input
answered with one ``windump: error:`` line, exit status 1 and no file left behind."""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest

from windump_plugins.frontends import cli, reports
from windump_plugins.errors import SourceError
from windump_plugins.hookspecs import SourceKind, hookimpl
from windump_plugins.plugins import Plugins
from windump_plugins.frontends.progress import progress_bar
from windump_plugins.sources import gdbstub, qmp, sample

ERROR_LINE = re.compile(r"^windump: error: \S.*\n\Z")


def assert_clean_failure(result, directory, before: set[str]) -> None:
    """Exit status 1, exactly one error line and no traceback, and no file added to ``directory``."""
    assert result.returncode == 1, result
    assert ERROR_LINE.match(result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert {path.name for path in directory.iterdir()} == before


def test_sample_to_verified_dump(run_windump, tmp_path):
    saved = run_windump("save", "sample:", "sample.dmp")
    assert saved.returncode == 0, saved.stderr
    assert saved.stderr == ""  # not a terminal: no progress bar
    size = (tmp_path / "sample.dmp").stat().st_size
    assert re.fullmatch(r"wrote sample\.dmp: \S+ \S+, \d+ runs, \d+ pages, \d+\.\d s, \d+ MB/s, from model\n",
                        saved.stdout)
    pages = int(re.search(r"(\d+) pages", saved.stdout).group(1))
    assert size == 0x2000 + pages * 0x1000
    verified = run_windump("verify", "sample.dmp")
    assert (verified.returncode, verified.stdout, verified.stderr) == (0, "sample.dmp: ok\n", "")
    info = run_windump("info", "sample.dmp")
    assert info.returncode == 0, info.stderr
    assert "PAGEDU64" in info.stdout
    assert f"{pages} pages" in info.stdout
    assert f"{size} bytes" in info.stdout


def test_quiet_save_prints_nothing(run_windump, tmp_path):
    result = run_windump("save", "-q", "sample:", "quiet.dmp")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert (tmp_path / "quiet.dmp").stat().st_size > 0x2000


def test_force_replaces_existing_output(run_windump, tmp_path):
    (tmp_path / "out.dmp").write_bytes(b"old")
    result = run_windump("save", "-q", "--force", "sample:", "out.dmp")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.dmp").read_bytes()[:8] == b"PAGEDU64"


def test_verify_reports_each_problem_and_fails(run_windump, tmp_path):
    """Six faults planted at REFERENCE section 1's offsets, and the last page cut off: one line
    each, in the order of the checks, and exit status 1."""
    assert run_windump("save", "-q", "sample:", "cut.dmp").returncode == 0
    dump = tmp_path / "cut.dmp"
    data = bytearray(dump.read_bytes())
    size, pages = len(data), struct.unpack_from("<Q", data, 0x090)[0]
    assert struct.unpack_from("<Q", data, 0xFA0)[0] == size  # RequiredDumpSpace, sound before the damage
    struct.pack_into("<I", data, 0x030, 0x14C)  # MachineImageType: i386 in a PAGEDU64 header
    struct.pack_into("<Q", data, 0x090, pages + 1)  # PhysicalMemoryBlock.NumberOfPages
    struct.pack_into("<Q", data, 0xFA0, 0)  # RequiredDumpSpace
    data[0xF9C:0xFA0] = b"PAGE"  # the pad after DumpType
    data[0xF90:0xF94] = b"PAGE"  # in the exception record's ExceptionInformation
    dump.write_bytes(data[:-0x1000])
    result = run_windump("verify", "cut.dmp")
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "cut.dmp: MachineImageType is 0x14c, expected 0x8664 in a PAGEDU64 dump",
        f"cut.dmp: NumberOfPages is {pages + 1}, the runs hold {pages}",
        f"cut.dmp: file size is {size - 0x1000} bytes, header and runs make {size}",
        f"cut.dmp: RequiredDumpSpace is 0x0, header and runs make {size:#x}",
        "cut.dmp: pad after DumpType (header offset 0xf9c) is 0x45474150, expected 0",
        'cut.dmp: the exception record still holds the "PAGE" filler at header offset 0xf90',
    ]
    assert result.stderr == ""


def test_plugins_lists_builtin_sources_with_versions(run_windump):
    result = run_windump("plugins")
    assert result.returncode == 0, result.stderr
    expected = version("windump")
    for name in ("elf", "sample"):
        assert re.search(rf"^{name}  windump {re.escape(expected)}  windump_plugins\.sources\.{name}$", result.stdout, re.M)
    assert re.search(r"^    sample:", result.stdout, re.M)


def test_save_help_lists_source_kinds_from_plugins(run_windump):
    result = run_windump("save", "--help")
    assert result.returncode == 0
    sources = re.split(r"^sources \(.*\):\n", result.stdout, maxsplit=1, flags=re.M)[1].split("\n\n", 1)[0]
    assert re.search(r"^  sample:", sources, re.M)
    # Each option as its source declares it, with its default.
    for option in sample.OPTIONS + gdbstub.OPTIONS + qmp.OPTIONS:
        assert f"      ?{option.usage}  " in sources, option.name
    assert re.search(r"\?cpus=N  vCPUs of the model, 1 to 8 \(default 2\)$", sources, re.M)
    assert re.search(r"\?timeout=S  seconds to wait for each QMP reply \(default 10\)$", sources, re.M)


def test_old_sample_syntax_still_works_with_a_warning(run_windump, tmp_path):
    old = run_windump("save", "-q", "sample:cpus=3,bugcheck=0x1E", "old.dmp")
    assert old.returncode == 0
    assert old.stderr == ("windump: warning: sample:cpus=3,bugcheck=0x1E: options after sample: are a query "
                          "string now: write sample:?cpus=3&bugcheck=0x1E\n")
    new = run_windump("save", "-q", "sample:?cpus=3&bugcheck=0x1E", "new.dmp")
    assert (new.returncode, new.stderr) == (0, "")
    old_info = run_windump("info", "--json", "old.dmp")
    new_info = run_windump("info", "--json", "new.dmp")
    facts = [{key: value for key, value in json.loads(result.stdout).items() if key not in ("file", "SystemTime", "Comment")}
             for result in (old_info, new_info)]
    assert facts[0] == facts[1] and (facts[0]["NumberProcessors"], facts[0]["BugCheckCode"]) == (3, "0x1e")


def test_verbose_logs_the_phases_of_a_save(run_windump):
    quiet = run_windump("save", "-q", "sample:", "a.dmp")
    assert quiet.stderr == ""
    for argv in (("-v", "save", "-q", "sample:", "b.dmp"), ("save", "-v", "-q", "sample:", "c.dmp")):
        result = run_windump(*argv)
        assert result.returncode == 0, result.stderr
        lines = result.stderr.splitlines()
        assert lines[0] == re.match(r"windump: info: sample:: opened in \d+\.\d\d s$", lines[0]).group(0)
        name = argv[-1]
        assert lines[-2] == f"windump: info: {name}: read from model"
        assert re.fullmatch(rf"windump: info: {name}: header \d+\.\d\d s, body \d+\.\d\d s \(\d+ MB/s\), "
                            r"sync \d+\.\d\d s", lines[-1]), lines


def test_verbose_twice_shows_debug_records(inline_cli, capsys, tmp_path):
    """-vv lets windump's debug records through, -v only info and above, each as one line."""
    logger = logging.getLogger("windump_plugins.sources.test")
    Interrupting.log = lambda self: (logger.debug("a debug record"), logger.info("an info record"))
    try:
        for flags, expected in ((["-v"], ["info"]), (["-vv"], ["debug", "info"]), ([], [])):
            assert inline_cli([*flags, "save", "log:", str(tmp_path / "out.dmp")]) == 1
            err = capsys.readouterr().err.splitlines()
            shown = [line.split(": ")[1] for line in err if "record" in line]
            assert shown == expected, err
            assert err[-1] == "windump: error: log: logged and stopped"
    finally:
        del Interrupting.log


def check_json(result, schema: dict) -> dict:
    """One JSON object on stdout, valid against ``schema`` (the one docs/cli.rst shows)."""
    value = json.loads(result.stdout)  # refuses anything after the one value
    assert isinstance(value, dict), result.stdout
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
    return value


def test_json_outputs_follow_their_schemas(run_windump, tmp_path):
    saved = check_json(run_windump("save", "--json", "sample:?cpus=3", "s.dmp"), reports.SAVE_SCHEMA)
    size = (tmp_path / "s.dmp").stat().st_size
    assert (saved["output"], saved["bytes_written"], saved["contexts"]) == ("s.dmp", size, 3)
    assert saved["access"] == {"path": "model", "passed_over": {}, "paused_seconds": None}
    assert size == 0x2000 + saved["pages"] * 0x1000

    info = check_json(run_windump("info", "--json", "s.dmp"), reports.INFO_SCHEMA)
    assert (info["file"], info["format"], info["ValidDump"], info["file_size"]) == ("s.dmp", "x64", "DU64", size)
    assert (info["NumberProcessors"], info["DumpType"], info["dump_kind"]) == (3, 1, "full")
    assert len(info["runs"]) == saved["runs"] and sum(run["PageCount"] for run in info["runs"]) == info["pages"]
    text = run_windump("info", "s.dmp").stdout
    assert f"KdDebuggerDataBlock  {info['KdDebuggerDataBlock']}\n" in text
    assert f"system time          {info['SystemTime']}\n" in text

    verified = check_json(run_windump("verify", "--json", "s.dmp"), reports.VERIFY_SCHEMA)
    assert verified == {"file": "s.dmp", "ok": True, "problems": []}
    (tmp_path / "s.dmp").write_bytes((tmp_path / "s.dmp").read_bytes()[:-0x1000])
    result = run_windump("verify", "--json", "s.dmp")
    assert result.returncode == 1 and result.stderr == ""
    damaged = check_json(result, reports.VERIFY_SCHEMA)
    assert not damaged["ok"] and f"file size is {size - 0x1000} bytes, header and runs make {size}" in damaged["problems"]

    listed = check_json(run_windump("plugins", "--json"), reports.PLUGINS_SCHEMA)
    by_name = {plugin["name"]: plugin for plugin in listed["plugins"]}
    assert sorted(by_name) == ["elf", "full", "gdb", "published", "qmp", "sample"]
    assert by_name["sample"]["version"] == version("windump")
    [kind] = by_name["gdb"]["sources"]
    assert [option["name"] for option in kind["options"]] == [option.name for option in gdbstub.OPTIONS]
    assert {"name": "timeout", "usage": "timeout=S", "help": "seconds to wait for each reply of the stub",
            "flag": False, "default": "10", "choices": []} in kind["options"]


def test_the_docs_show_the_schemas_the_outputs_are_checked_against():
    """docs/cli.rst renders each command's ``--json`` schema from the same table the parser uses."""
    root = Path(__file__).resolve().parent.parent
    assert ".. windump-commands::" in (root / "docs" / "cli.rst").read_text()
    sys.path.insert(0, str(root / "docs" / "_ext"))
    try:
        import windumpcli
    finally:
        sys.path.remove(str(root / "docs" / "_ext"))
    schemas = {entry.name: entry.json_schema for entry in cli.COMMANDS if entry.json_schema is not None}
    assert schemas == {"save": reports.SAVE_SCHEMA, "info": reports.INFO_SCHEMA, "verify": reports.VERIFY_SCHEMA,
                       "plugins": reports.PLUGINS_SCHEMA}
    for entry in cli.COMMANDS:
        page = "\n".join(windumpcli._command_lines(entry))
        if entry.json_schema is None:
            assert "--json" not in page
            continue
        block = page.split(".. code-block:: json\n\n", 1)[1]
        assert json.loads("\n".join(line[4:] for line in block.splitlines() if line.startswith("    "))) == entry.json_schema
        for name in entry.json_schema["properties"]:
            assert f"   * - ``{name}``" in page, (entry.name, name)


@pytest.mark.parametrize("argv", [("info", "--json", "missing.dmp"), ("verify", "--json", "missing.dmp"),
                                  ("save", "--json", "sample:?cpus=9", "out.dmp")])
def test_json_errors_are_one_line_on_stderr(run_windump, tmp_path, argv):
    result = run_windump(*argv)
    assert_clean_failure(result, tmp_path, set())


@pytest.mark.parametrize("case", ["empty", "not-elf", "directory", "missing"])
def test_bad_source_is_one_error_line(run_windump, tmp_path, case):
    (tmp_path / "empty.elf").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a dump\n")
    (tmp_path / "folder").mkdir()
    source = {"empty": "empty.elf", "not-elf": "notes.txt", "directory": "folder", "missing": "missing.elf"}[case]
    before = {path.name for path in tmp_path.iterdir()}
    result = run_windump("save", source, "out.dmp")
    assert_clean_failure(result, tmp_path, before)
    assert source in result.stderr


def test_existing_output_is_kept_without_force(run_windump, tmp_path):
    (tmp_path / "out.dmp").write_bytes(b"keep me")
    result = run_windump("save", "sample:", "out.dmp")
    assert_clean_failure(result, tmp_path, {"out.dmp"})
    assert "--force" in result.stderr
    assert (tmp_path / "out.dmp").read_bytes() == b"keep me"


def test_missing_output_directory(run_windump, tmp_path):
    result = run_windump("save", "sample:", "no/such/dir/out.dmp")
    assert_clean_failure(result, tmp_path, set())
    assert "no/such/dir/out.dmp" in result.stderr


def test_unknown_scheme_lists_known_sources(run_windump, tmp_path):
    result = run_windump("save", "nosuch:thing", "out.dmp")
    assert_clean_failure(result, tmp_path, set())
    assert "sample:" in result.stderr


def test_debug_shows_the_traceback(run_windump, tmp_path):
    result = run_windump("--debug", "save", "missing.elf", "out.dmp")
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.endswith("windump: error: missing.elf: No such file or directory\n")


def test_usage_errors_exit_2(run_windump):
    assert run_windump("save", "only-one-argument").returncode == 2
    assert run_windump().returncode == 2
    assert run_windump("frobnicate").returncode == 2


def test_version(run_windump):
    result = run_windump("--version")
    assert (result.returncode, result.stdout) == (0, f"windump {version('windump')}\n")


def test_broken_plugin_warns_and_the_rest_work(run_windump, tmp_path):
    site = tmp_path / "site"
    (site / "brokenplug-0.3.dist-info").mkdir(parents=True)
    (site / "brokenplug-0.3.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplug\nVersion: 0.3\n")
    (site / "brokenplug-0.3.dist-info" / "entry_points.txt").write_text("[windump]\nbroken = windump_test_absent_module\n")
    result = run_windump("plugins", env={"PYTHONPATH": str(site), "WINDUMP_PLUGINS": "elf,sample,broken"})
    assert result.returncode == 0
    assert result.stderr == (
        "windump: warning: plugin broken (brokenplug 0.3) failed to load: "
        "ModuleNotFoundError: No module named 'windump_test_absent_module'\n"
    )
    assert re.search(r"^sample  ", result.stdout, re.M)


class Interrupting:
    @hookimpl
    def windump_open_location(self, location):
        if location == "log:":
            self.log()
            raise SourceError("log: logged and stopped")
        if location == "ctrl-c:":
            raise KeyboardInterrupt
        if location == "bug:":
            raise RuntimeError("the plugin broke")
        if location == "warn:":
            warnings.warn("the guest looks odd", UserWarning)
            raise SourceError("warn: cannot go on")
        return None

    @hookimpl
    def windump_source_kinds(self):
        return [SourceKind("ctrl-c:", "interrupts"), SourceKind("bug:", "raises RuntimeError")]


@pytest.fixture
def inline_cli(monkeypatch):
    """``cli.main`` with one in-process plugin instead of the installed ones."""
    plugins = Plugins()
    plugins.register(Interrupting(), "interrupting")
    monkeypatch.setattr(cli, "load_plugins", lambda: plugins)
    try:
        yield cli.main
    finally:
        plugins.unregister("interrupting")


def test_ctrl_c_exits_130(inline_cli, capsys, tmp_path):
    assert inline_cli(["save", "ctrl-c:", str(tmp_path / "out.dmp")]) == 130
    assert capsys.readouterr().err == "windump: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_plugin_bug_is_one_line_naming_the_plugin(inline_cli, capsys, tmp_path):
    assert inline_cli(["save", "bug:", str(tmp_path / "out.dmp")]) == 1
    assert capsys.readouterr().err == "windump: error: plugin interrupting failed: RuntimeError: the plugin broke\n"


def test_warnings_are_one_line_each(inline_cli, capsys, tmp_path):
    assert inline_cli(["save", "warn:", str(tmp_path / "out.dmp")]) == 1
    assert capsys.readouterr().err == "windump: warning: the guest looks odd\nwindump: error: warn: cannot go on\n"


def test_help_lists_inline_plugin_kinds(inline_cli, capsys):
    with pytest.raises(SystemExit) as exited:
        inline_cli(["save", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert re.search(r"^  ctrl-c:\n      interrupts$", out, re.M)
    assert re.search(r"^  bug:\n      raises RuntimeError$", out, re.M)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal():
    with progress_bar("x", stream=io.StringIO()) as progress:
        assert progress is None
    with progress_bar("x", enabled=False, stream=Terminal()) as progress:
        assert progress is None
    terminal = Terminal()
    with progress_bar("guest.dmp", stream=terminal) as progress:
        progress(0, 3 << 20)
        progress(3 << 20, 3 << 20)
    shown = terminal.getvalue()
    assert "guest.dmp" in shown
    assert "3.00M/3.00M" in shown


def test_readme_quickstart_is_one_line_each_and_ci_runs_the_tests_line():
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    lines = {}
    for name in ("sample", "tests"):
        block = re.search(rf"^<!-- quickstart:{name} -->\n```sh\n(.*?)```\n<!-- /quickstart:{name} -->$", readme, re.M | re.S)
        assert block, name
        assert block.group(1).count("\n") == 1, block.group(1)
        lines[name] = block.group(1).strip()
    assert "windump save sample: sample.dmp" in lines["sample"]
    assert lines["tests"] == "bash scripts/test.sh"
    assert (root / "scripts" / "test.sh").exists()
    assert "quickstart tests" in (root / ".ci" / "run").read_text()
