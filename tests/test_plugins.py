"""The plugin manager: inline plugins, broken and misspelled plugins, selection by environment, and
how a source name becomes an open source."""

from __future__ import annotations

import os

import numpy as np
import pytest

from windump_plugins.errors import SourceError, WindumpError
from windump_plugins.hookspecs import SourceKind, hookimpl
from windump_plugins.plugins import CORE_PLUGINS, PluginError, Plugins, PluginWarning, load_plugins
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
