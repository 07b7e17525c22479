"""The plugin manager: inline plugins, broken and misspelled plugins, selection by environment, and
how a source name becomes an open source."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from windump_plugins.errors import SourceError, WindumpError
from windump_plugins.hookspecs import SourceKind, hookimpl
from windump_plugins.plugins import (
    CORE_PLUGINS,
    PluginError,
    Plugins,
    PluginWarning,
    load_plugins,
)
from windump_plugins.source import MemorySource


class OnePageSource(MemorySource):
    """One page of RAM at address 0, filled with ``fill``."""

    def __init__(self, description: str, fill: int = 0xAB):
        self.description = description
        self.fill = fill
        self.closed = False

    @property
    def ram(self) -> np.ndarray:
        return np.array([[0, 0x1000]], dtype=np.uint64)

    def readinto(self, address: int, buffer: memoryview) -> None:
        self.check_range(address, len(buffer))
        buffer[:] = bytes([self.fill]) * len(buffer)

    def close(self) -> None:
        self.closed = True


class FakeScheme:
    """Opens ``fake:NAME`` and any file that starts with ``FAKE``."""

    @hookimpl
    def windump_open_location(self, location):
        if location.startswith("fake:"):
            return OnePageSource(location)
        return None

    @hookimpl
    def windump_open_file(self, path, head):
        return OnePageSource(path) if head.startswith(b"FAKE") else None

    @hookimpl
    def windump_source_kinds(self):
        return [SourceKind("fake:NAME", "a page of 0xAB"), SourceKind("FILE.fake", "a file starting FAKE")]


def test_inline_plugin_opens_locations_and_files_until_unregistered(tmp_path):
    plugins = Plugins()
    plugins.register(FakeScheme(), "fake")
    try:
        with plugins.open_source("fake:one") as source:
            assert source.description == "fake:one"
            assert source.read(0x10, 4) == b"\xab" * 4
        claimed = tmp_path / "memory.fake"
        claimed.write_bytes(b"FAKE" + bytes(100))
        assert plugins.open_source(str(claimed)).description == str(claimed)
        assert [kind.pattern for kind in plugins.kinds()] == ["fake:NAME", "FILE.fake"]
        (info,) = plugins.describe()
        assert (info.name, info.dist, info.version) == ("fake", None, None)
        assert info.module == __name__
        assert [kind.pattern for kind in info.kinds] == ["fake:NAME", "FILE.fake"]
    finally:
        plugins.unregister("fake")
    with pytest.raises(SourceError, match=r"^no plugin opens fake:one: unknown scheme 'fake'; no source plugins"):
        plugins.open_source("fake:one")
    assert plugins.describe() == []


def test_last_registered_plugin_is_asked_first():
    class Second:
        @hookimpl
        def windump_open_location(self, location):
            return OnePageSource("second", fill=2)

    plugins = Plugins()
    plugins.register(FakeScheme(), "fake")
    plugins.register(Second(), "second")
    assert plugins.open_source("fake:x").description == "second"
    plugins.unregister("second")
    assert plugins.open_source("fake:x").description == "fake:x"


def test_unexpected_exception_in_a_hook_is_blamed_on_its_plugin():
    class Broken:
        @hookimpl
        def windump_open_location(self, location):
            raise ZeroDivisionError("division by zero")

    plugins = Plugins()
    plugins.register(Broken(), "broken")
    with pytest.raises(PluginError, match=r"^plugin broken failed: ZeroDivisionError: division by zero$") as caught:
        plugins.open_source("any:thing")
    assert isinstance(caught.value, WindumpError)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_windump_error_from_a_hook_passes_through_unchanged():
    class Refuses:
        @hookimpl
        def windump_open_location(self, location):
            raise SourceError("refuse:x: connection refused")

    plugins = Plugins()
    plugins.register(Refuses(), "refuses")
    with pytest.raises(SourceError, match=r"^refuse:x: connection refused$"):
        plugins.open_source("refuse:x")


def test_hook_returning_a_non_source_is_the_plugin_s_fault():
    class Wrong:
        @hookimpl
        def windump_open_location(self, location):
            return "not a source"

    plugins = Plugins()
    plugins.register(Wrong(), "wrong")
    with pytest.raises(PluginError, match=r"^plugin wrong failed: windump_open_location returned str, not a MemorySource$"):
        plugins.open_source("x:y")


def test_misspelled_hook_is_a_warning_and_the_plugin_is_dropped():
    class Misspelled:
        @hookimpl
        def windump_open_locaton(self, location):
            return OnePageSource(location)

    messages: list[str] = []
    plugins = Plugins(warn=messages.append)
    plugins.register(Misspelled(), "typo")
    assert len(messages) == 1
    assert messages[0].startswith("plugin typo skipped:")
    assert "windump_open_locaton" in messages[0]
    assert plugins.names() == []


def test_source_path_errors(tmp_path, monkeypatch):
    plugins = Plugins()
    plugins.register(FakeScheme(), "fake")
    missing = tmp_path / "missing.elf"
    with pytest.raises(SourceError, match=rf"^{missing}: No such file or directory$"):
        plugins.open_source(str(missing))
    with pytest.raises(SourceError, match=rf"^{tmp_path} is a directory, expected a QEMU ELF dump file or SCHEME:\.\.\.$"):
        plugins.open_source(str(tmp_path))
    empty = tmp_path / "empty.elf"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match=rf"^{empty} is empty$"):
        plugins.open_source(str(empty))
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(SourceError, match=r"no plugin reads this file \(starts with b'hello\\n'\); known sources: fake:NAME, FILE\.fake$"):
        plugins.open_source(str(text))
    # An existing file whose name looks like a location is a file.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake:file").write_bytes(b"FAKE")
    assert plugins.open_source("fake:file").description == "fake:file"


def test_a_fifo_a_character_device_or_a_socket_is_refused_before_a_byte_is_read(tmp_path):
    # Run in a child with a timeout: before the fix, opening a FIFO with no writer blocks for ever.
    fifo = tmp_path / "dump.elf"
    os.mkfifo(fifo)
    sock = tmp_path / "dump.sock"
    script = (
        "import socket, sys\n"
        "from windump_plugins.errors import SourceError\n"
        "from windump_plugins.plugins import Plugins\n"
        "server = socket.socket(socket.AF_UNIX); server.bind(sys.argv[3])\n"
        "for spec in sys.argv[1:]:\n"
        "    try:\n"
        "        Plugins().open_source(spec)\n"
        "    except SourceError as error:\n"
        "        print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(fifo), "/dev/null", str(sock)],
                            capture_output=True, text=True, timeout=30)
    assert result.stderr == ""
    expected = "not a file: expected a QEMU ELF dump file or SCHEME:..."
    assert result.stdout.splitlines() == [f"{fifo} is a FIFO (named pipe), {expected}",
                                          f"/dev/null is a character device, {expected}",
                                          f"{sock} is a socket, {expected}"]


def test_open_file_sees_at_most_4096_bytes_of_head(tmp_path):
    seen = []

    class Recorder:
        @hookimpl
        def windump_open_file(self, path, head):
            seen.append(head)

    plugins = Plugins()
    plugins.register(Recorder(), "recorder")
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(SourceError):
        plugins.open_source(str(big))
    assert seen == [big.read_bytes()[:4096]]


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """A distribution ``fakeplugs 1.2`` on sys.path with entry points ``good`` (a working module)
    and ``broken`` (a module that is not there)."""
    site = tmp_path / "site"
    (site / "fakeplugs-1.2.dist-info").mkdir(parents=True)
    (site / "fakeplugs-1.2.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugs\nVersion: 1.2\n")
    (site / "fakeplugs-1.2.dist-info" / "entry_points.txt").write_text(
        "[windump]\ngood = windump_test_goodplug\nbroken = windump_test_no_such_module\n"
    )
    (site / "windump_test_goodplug.py").write_text(
        "from windump_plugins.hookspecs import SourceKind, hookimpl\n\n"
        "@hookimpl\n"
        "def windump_source_kinds():\n"
        "    return [SourceKind('good:', 'a test source')]\n"
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_broken_entry_point_only_warns(fake_distribution):
    messages: list[str] = []
    plugins = load_plugins({"WINDUMP_PLUGINS": "good,broken"}, warn=messages.append)
    assert messages == [
        "plugin broken (fakeplugs 1.2) failed to load: "
        "ModuleNotFoundError: No module named 'windump_test_no_such_module'"
    ]
    (info,) = [info for info in plugins.describe() if info.name not in CORE_PLUGINS]
    assert (info.name, info.dist, info.version, info.module) == ("good", "fakeplugs", "1.2", "windump_test_goodplug")
    assert info.hooks == ("windump_source_kinds",)
    assert [kind.pattern for kind in plugins.kinds()] == ["good:"]


def test_default_warning_is_a_plugin_warning(fake_distribution):
    with pytest.warns(PluginWarning, match=r"^plugin broken \(fakeplugs 1\.2\) failed to load"):
        load_plugins({"WINDUMP_PLUGINS": "broken"})


def test_environment_selects_plugins(fake_distribution):
    # Other installed plugins load too when only some are disabled: their warnings are not ours.
    others: list[str] = []
    everything = load_plugins({"WINDUMP_DISABLE_PLUGINS": "broken"}, warn=others.append).names()
    assert "good" in everything and "broken" not in everything
    assert "good" not in load_plugins({"WINDUMP_DISABLE_PLUGINS": "good,broken"}, warn=others.append).names()
    assert not [message for message in others if "fakeplugs" in message]
    messages: list[str] = []
    # The core plugins (the published header, the full format) load whatever WINDUMP_PLUGINS says.
    assert load_plugins({"WINDUMP_PLUGINS": "good"}, warn=messages.append).names() == ["full", "good", "published"]
    assert load_plugins({"WINDUMP_PLUGINS": ""}, warn=messages.append).names() == ["full", "published"]
    assert messages == []
    assert load_plugins({"WINDUMP_PLUGINS": "good,absent"}, warn=messages.append).names() == ["full", "good", "published"]
    assert messages == ["WINDUMP_PLUGINS names plugin absent, but no installed plugin has that name"]
    # Only WINDUMP_DISABLE_PLUGINS skips them.
    assert load_plugins({"WINDUMP_PLUGINS": "good", "WINDUMP_DISABLE_PLUGINS": "published"},
                        warn=messages.append).names() == ["full", "good"]


def test_a_distribution_cannot_displace_a_builtin_plugin(tmp_path, monkeypatch):
    # First on sys.path, so its entry points come before windump's own.
    site = tmp_path / "site"
    (site / "impostor-6.6.dist-info").mkdir(parents=True)
    (site / "impostor-6.6.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: impostor\nVersion: 6.6\n")
    (site / "impostor-6.6.dist-info" / "entry_points.txt").write_text(
        "[windump]\nelf = windump_test_impostor\npublished = windump_test_impostor\n")
    (site / "windump_test_impostor.py").write_text(
        "from windump_plugins.hookspecs import SourceKind, hookimpl\n\n"
        "@hookimpl\n"
        "def windump_source_kinds():\n"
        "    return [SourceKind('impostor:', 'not windump')]\n"
    )
    monkeypatch.syspath_prepend(str(site))
    from importlib.metadata import version
    windump = f"windump {version('windump')}"
    messages: list[str] = []
    plugins = load_plugins({"WINDUMP_PLUGINS": "elf,published"}, warn=messages.append)
    assert sorted(messages) == [
        f"plugin {name} (impostor 6.6) skipped: windump's built-in plugin {name} ({windump}) has that name and keeps it"
        for name in ("elf", "published")]
    assert {info.name: (info.dist, info.module) for info in plugins.describe()} == {
        "elf": ("windump", "windump_plugins.sources.elf"),
        "full": ("windump", "windump_plugins.outputs.full"),
        "published": ("windump", "windump_plugins.headers.published")}
    assert "impostor:" not in [kind.pattern for kind in plugins.kinds()]
    with pytest.warns(PluginWarning, match=r"^plugin published \(impostor 6\.6\) skipped: windump's built-in"):
        load_plugins({"WINDUMP_PLUGINS": "published"})
    # Not asked for, it is not loaded and displaces nothing: no warning.
    assert load_plugins({"WINDUMP_PLUGINS": "sample"}, warn=pytest.fail).names() == ["full", "published", "sample"]


def test_builtin_plugins_come_from_entry_points():
    names = load_plugins({"WINDUMP_PLUGINS": "elf,sample"}, warn=pytest.fail).names()
    assert names == ["elf", "full", "published", "sample"]
    core = load_plugins({"WINDUMP_PLUGINS": "elf"}, warn=pytest.fail, core_only=True)
    assert core.names() == sorted(CORE_PLUGINS)
    hooks = {info.name: (info.dist, info.module, info.hooks) for info in core.describe()}
    assert hooks == {"published": ("windump", "windump_plugins.headers.published", ("windump_dump_header",)),
                     "full": ("windump", "windump_plugins.outputs.full", ("windump_output_formats",))}


def test_spec_that_is_neither_file_nor_location_names_the_path(tmp_path):
    plugins = Plugins()
    with pytest.raises(SourceError, match=r"No such file or directory$"):
        plugins.open_source(os.path.join(str(tmp_path), "a:b"))


# -- calls go through pluggy: wrappers, tracing, monitoring -------------------------------------------


class KindsWrapper:
    """A standard new-style wrapper around windump_source_kinds: sees every answer, adds its own."""

    def __init__(self):
        self.seen = None

    @hookimpl(wrapper=True)
    def windump_source_kinds(self):
        answers = yield
        self.seen = [kind.pattern for kinds in answers for kind in kinds]
        return [*answers, [SourceKind("wrapped:", "added by a wrapper")]]


def test_a_wrapper_hookimpl_works_and_save_help_still_lists_the_kinds(monkeypatch, capsys):
    from windump_plugins.frontends import cli

    plugins = Plugins()
    wrapper = KindsWrapper()
    plugins.register(FakeScheme(), "fake")
    plugins.register(wrapper, "wrapper")
    monkeypatch.setattr(cli, "load_plugins", lambda: plugins)
    with pytest.raises(SystemExit) as exited:
        cli.main(["save", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "  fake:NAME\n      a page of 0xAB" in out and "  wrapped:\n      added by a wrapper" in out
    assert wrapper.seen == ["fake:NAME", "FILE.fake"]
    # The wrapper also sits around a firstresult hook call it does not implement: no harm done.
    assert plugins.open_source("fake:x").description == "fake:x"


def test_an_old_style_hookwrapper_sees_the_outcome():
    outcomes = []

    class OldStyle:
        @hookimpl(hookwrapper=True)
        def windump_open_location(self, location):
            outcome = yield
            outcomes.append((location, outcome.get_result().description))

    plugins = Plugins()
    plugins.register(FakeScheme(), "fake")
    plugins.register(OldStyle(), "old")
    assert plugins.open_source("fake:y").description == "fake:y"
    assert outcomes == [("fake:y", "fake:y")]


def test_a_raising_wrapper_is_named_in_one_line():
    class BadWrapper:
        @hookimpl(wrapper=True)
        def windump_open_location(self, location):
            yield
            raise KeyError("lost")

    plugins = Plugins()
    plugins.register(FakeScheme(), "fake")
    plugins.register(BadWrapper(), "badwrap")
    with pytest.raises(PluginError, match=r"^plugin badwrap failed: KeyError: 'lost'$"):
        plugins.open_source("fake:z")


def test_a_failing_implementation_of_a_collecting_hook_leaves_the_others_answers():
    class BrokenKinds:
        @hookimpl
        def windump_source_kinds(self):
            raise RuntimeError("no kinds today")

    class WrongKinds:
        @hookimpl
        def windump_source_kinds(self):
            return ["fake:"]

    messages: list[str] = []
    plugins = Plugins(warn=messages.append)
    plugins.register(FakeScheme(), "fake")
    plugins.register(BrokenKinds(), "broken")
    plugins.register(WrongKinds(), "wrong")
    assert [kind.pattern for kind in plugins.kinds()] == ["fake:NAME", "FILE.fake"]
    assert messages == ["plugin wrong failed: windump_source_kinds returned a list holding str, not a list of SourceKind",
                        "plugin broken failed: RuntimeError: no kinds today"]
    messages.clear()
    described = {info.name: [kind.pattern for kind in info.kinds] for info in plugins.describe()}
    assert described == {"broken": [], "fake": ["fake:NAME", "FILE.fake"], "wrong": []}
    assert len(messages) == 2


def test_hook_call_monitoring_and_pluggy_tracing_see_every_call():
    plugins = Plugins()
    plugins.register(FakeScheme(), "fake")
    calls = []
    undo = plugins.manager.add_hookcall_monitoring(
        lambda name, impls, kwargs: calls.append((name, [impl.plugin_name for impl in impls], dict(kwargs))),
        lambda outcome, name, impls, kwargs: calls.append((name, outcome.get_result())))
    traced: list[str] = []
    plugins.manager.trace.root.setwriter(traced.append)
    untrace = plugins.manager.enable_tracing()
    try:
        source = plugins.open_source("fake:m")
    finally:
        undo()
        untrace()
    assert calls == [("windump_open_location", ["fake"], {"location": "fake:m"}), ("windump_open_location", source)]
    assert any("windump_open_location" in line for line in traced)


def test_trace_switch_prints_each_call_and_result(capsys):
    plugins = load_plugins({"WINDUMP_PLUGINS": "sample", "WINDUMP_TRACE_PLUGINS": "1"}, warn=pytest.fail)
    plugins.kinds()
    with pytest.raises(SourceError):
        plugins.open_source("nosuch:thing")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("windump: trace: windump_source_kinds() asks ")
    assert "sample" in lines[0]
    assert lines[1].startswith("windump: trace: windump_source_kinds -> [[SourceKind(pattern='sample:")
    assert "windump: trace: windump_open_location(location='nosuch:thing') asks " in lines[2]
    assert lines[3] == "windump: trace: windump_open_location -> None"
    quiet = load_plugins({"WINDUMP_PLUGINS": "sample", "WINDUMP_TRACE_PLUGINS": "0"}, warn=pytest.fail)
    quiet.kinds()
    assert capsys.readouterr().err == ""


def test_trace_switch_in_the_command_line(run_windump):
    result = run_windump("plugins", env={"WINDUMP_TRACE_PLUGINS": "1"})
    assert result.returncode == 0
    assert "windump: trace: windump_source_kinds() asks sample" in result.stderr
    assert "\nsample  windump " in "\n" + result.stdout


# -- the public API at the package's top ---------------------------------------------------------------


def test_the_package_top_imports_no_numpy_until_asked():
    code = ("import sys, windump_plugins\n"
            "assert 'numpy' not in sys.modules\n"
            "from windump_plugins import hookimpl, SourceKind, HeaderCandidate, OutputFormat, WindumpError\n"
            "assert 'numpy' not in sys.modules, 'the hook API needs no numpy'\n"
            "from windump_plugins import MemorySource\n"
            "assert 'numpy' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_public_name_resolves_to_its_defining_module():
    import windump_plugins
    from windump_plugins import errors, filemap, hookspecs, notescan, source

    assert windump_plugins.hookimpl is hookspecs.hookimpl
    assert windump_plugins.MemorySource is source.MemorySource
    assert windump_plugins.FileMapSource is filemap.FileMapSource
    assert windump_plugins.SourceError is errors.SourceError
    assert windump_plugins.scan_for_note is notescan.scan_for_note
    assert set(windump_plugins.__all__) == {"__version__", *windump_plugins._API}
    for name in windump_plugins.__all__:
        assert getattr(windump_plugins, name) is not None, name
    assert set(windump_plugins.__all__) <= set(dir(windump_plugins))
    # What type checkers see names the same things.
    tree = ast.parse(Path(windump_plugins.__file__).read_text())
    checked = {alias.asname: f"{node.module}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.level == 1 for alias in node.names if alias.asname}
    assert checked == windump_plugins._API
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        windump_plugins.nothing_here  # noqa: B018


def test_the_wheel_ships_py_typed(tmp_path):
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", "build", "_build", "tests", "docs", "drivers", "benchmarks"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(tmp_path / "src")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("windump-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "windump_plugins/py.typed" in names
    assert {"windump_plugins/hookspecs.py", "windump_plugins/outputs/full.py", "windump_plugins/headers/published.py"} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "published = windump_plugins.headers.published" in entry_points
    assert "full = windump_plugins.outputs.full" in entry_points
