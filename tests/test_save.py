"""``save`` as the one place data flows from: it tells the source its reads are done (after the last
read, before the file is synced), picks the writeback the source declares, takes the header from
the ``windump_dump_header`` candidates and the layout from the ``windump_output_formats`` hook."""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import pytest

from windump_plugins import pagecopy
from windump_plugins.dumpfile import DumpFile
from windump_plugins.errors import SourceError, WindumpError, WindumpWarning
from windump_plugins.formats.dumpheader import PAGE_SIZE, header_bytes
from windump_plugins.guest.model import CrashedGuest
from windump_plugins.headers.choice import NO_HEADER_MESSAGE
from windump_plugins.headers.published import NO_NOTE_MESSAGE, prepare_header
from windump_plugins.hookspecs import Layout, OutputFormat, hookimpl
from windump_plugins.plugins import PluginError, Plugins, load_plugins
from windump_plugins.save import save
from windump_plugins.sources.sample import SampleSource
from windump_plugins.verify import verify_dump

GUEST = {"cpus": 2}


class RecordingSource(SampleSource):
    """The model guest, recording reads, ``reading_done`` and (through ``events``) the fsyncs; with
    ``fail_in_body``, the body's large reads fail."""

    def __init__(self, events: list[str], *, fail_in_body: bool = False, resumes: bool = False):
        super().__init__(CrashedGuest(**GUEST), "recording:")
        self.events = events
        self.fail_in_body = fail_in_body
        self.resumes_after_reading = resumes

    def readinto(self, address: int, buffer: memoryview) -> None:
        if self.fail_in_body and len(buffer) > 0x10000:
            raise SourceError("recording: the guest went away")
        self.events.append("read")
        super().readinto(address, buffer)

    def reading_done(self) -> None:
        self.events.append("reading_done")


@pytest.fixture
def events(monkeypatch) -> list[str]:
    recorded: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (recorded.append("fsync"), real_fsync(fd))[-1])
    return recorded


def test_reading_done_comes_after_the_last_read_and_before_the_sync(tmp_path, events):
    report = save(RecordingSource(events), tmp_path / "guest.dmp")
    done = events.index("reading_done")
    assert events.count("reading_done") == 1
    assert "read" not in events[done:] and events[done + 1:] == ["fsync", "fsync"]  # the file, its directory
    assert (report.header, report.output_format) == ("published", "full")
    assert verify_dump(tmp_path / "guest.dmp") == []


def test_reading_done_is_not_announced_when_reading_fails(tmp_path, events):
    source = RecordingSource(events, fail_in_body=True)
    with pytest.raises(SourceError, match="the guest went away"):
        save(source, tmp_path / "guest.dmp")
    assert "reading_done" not in events and "fsync" not in events
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("resumes", [False, True])
def test_writeback_follows_the_source_s_declaration(tmp_path, monkeypatch, resumes):
    """A source that keeps its guest paused while read gets its writeback at the final fsync, every
    other source chunk by chunk."""
    started = []
    monkeypatch.setattr(pagecopy, "start_writeback", lambda fd, offset, length: started.append(length))
    report = save(RecordingSource([], resumes=resumes), tmp_path / "guest.dmp")
    assert sum(started) == (0 if resumes else report.bytes_written)


# -- the header: candidates in a declared order, cross-checked ----------------------------------------


def plugins_with(*extra: tuple[str, object]) -> Plugins:
    """windump's core plugins (the published header, the full format) and ``extra``."""
    plugins = load_plugins({}, warn=pytest.fail, core_only=True)
    for name, plugin in extra:
        plugins.register(plugin, name)
    return plugins


class Symbols:
    """A second header method, as the driverless one will be: the published header, edited."""

    def __init__(self, edit=None, method="symbols"):
        self.edit = edit
        self.method = method
        self.asked = 0

    @hookimpl
    def windump_dump_header(self, source):
        self.asked += 1
        candidate = prepare_header(source)
        if self.edit:
            self.edit(candidate.header)
        return dataclasses.replace(candidate, method=self.method)


def test_the_published_header_is_chosen_and_a_disagreeing_candidate_warned_about(tmp_path):
    def edit(header):
        header["DirectoryTableBase"] += 0x1000
        header["MinorVersion"] = 1

    source = SampleSource(CrashedGuest(**GUEST))
    symbols = Symbols(edit)
    with pytest.warns(WindumpWarning) as caught:
        report = save(source, tmp_path / "guest.dmp", plugins=plugins_with(("symbols", symbols)))
    (message,) = [str(warning.message) for warning in caught]
    dtb = source.guest.directory_table_base
    assert message == (f"the symbols header disagrees with the published one the dump uses: "
                       f"MinorVersion 0x1 (published: {source.guest.header['MinorVersion']:#x}), "
                       f"DirectoryTableBase {int(source.guest.header['DirectoryTableBase']) + 0x1000:#x} "
                       f"(published: {int(source.guest.header['DirectoryTableBase']):#x})")
    assert symbols.asked == 1 and report.header == "published"
    assert int(DumpFile(tmp_path / "guest.dmp").header["DirectoryTableBase"]) & ~0xFFF == dtb & ~0xFFF


def test_agreeing_candidates_are_silent(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = save(SampleSource(CrashedGuest(**GUEST)), tmp_path / "guest.dmp",
                      plugins=plugins_with(("symbols", Symbols())))
    assert report.header == "published"


def test_another_method_writes_the_dump_when_the_guest_published_nothing(tmp_path):
    class NoNote(SampleSource):
        def vmcoreinfo(self):
            return None

    class Rescue:
        @hookimpl
        def windump_dump_header(self, source):
            return dataclasses.replace(prepare_header(SampleSource(source.guest)), method="symbols")

    report = save(NoNote(CrashedGuest(**GUEST)), tmp_path / "guest.dmp", plugins=plugins_with(("rescue", Rescue())))
    assert report.header == "symbols"
    assert verify_dump(tmp_path / "guest.dmp") == []
    # Without it, the published method's reason is the error.
    with pytest.raises(WindumpError) as error:
        save(NoNote(CrashedGuest(**GUEST)), tmp_path / "other.dmp")
    assert str(error.value) == NO_NOTE_MESSAGE


def test_a_candidate_s_overlays_are_in_the_dump(tmp_path):
    """A method that decodes something (the KDBG, for the driverless header) has the dump hold it."""
    guest = CrashedGuest(**GUEST)
    page = int(guest.windows_runs()[-1, 0]) + 1
    decoded = (page * PAGE_SIZE + 0x10, b"decoded KDBG")

    class Decoding:
        @hookimpl
        def windump_dump_header(self, source):
            return dataclasses.replace(prepare_header(source), method="decoding", overlays=(decoded,))

    plugins = load_plugins({"WINDUMP_DISABLE_PLUGINS": "published"}, warn=pytest.fail, core_only=True)
    plugins.register(Decoding(), "decoding")
    report = save(SampleSource(guest), tmp_path / "guest.dmp", plugins=plugins)
    assert report.header == "decoding"
    dump = DumpFile(tmp_path / "guest.dmp")
    assert dump.read(decoded[0], len(decoded[1])) == decoded[1]
    assert dump.read(page * PAGE_SIZE, 0x10) == guest.read(page * PAGE_SIZE, 0x10)


def test_a_raising_header_plugin_is_named_and_the_published_header_survives(tmp_path):
    class Broken:
        @hookimpl
        def windump_dump_header(self, source):
            raise IndexError("symbol table")

    with pytest.warns(WindumpWarning, match=r"^plugin broken failed: IndexError: symbol table$"):
        report = save(SampleSource(CrashedGuest(**GUEST)), tmp_path / "guest.dmp",
                      plugins=plugins_with(("broken", Broken())))
    assert report.header == "published" and verify_dump(tmp_path / "guest.dmp") == []


def test_without_a_header_plugin_the_error_says_so(tmp_path):
    plugins = load_plugins({"WINDUMP_DISABLE_PLUGINS": "published"}, warn=pytest.fail, core_only=True)
    with pytest.raises(WindumpError) as error:
        save(SampleSource(CrashedGuest(**GUEST)), tmp_path / "guest.dmp", plugins=plugins)
    assert str(error.value) == NO_HEADER_MESSAGE.format(source="sample:")
    assert os.listdir(tmp_path) == []


# -- the output format ------------------------------------------------------------------------------


class Reversed(OutputFormat):
    """The runs in reverse order after the header: a layout other than the full one."""

    name = "reversed"
    summary = "runs last to first"

    def layout(self, header, runs):
        return Layout(header_bytes(header), np.asarray(runs)[::-1].copy())


class Formats:
    def __init__(self, *formats):
        self.formats = list(formats)

    @hookimpl
    def windump_output_formats(self):
        return self.formats


def test_a_plugin_s_output_format_lays_out_the_file(tmp_path):
    source = SampleSource(CrashedGuest(**GUEST))
    full = save(source, tmp_path / "full.dmp")
    report = save(source, tmp_path / "reversed.dmp", plugins=plugins_with(("reversed", Formats(Reversed()))),
                  output_format="reversed")
    assert report.output_format == "reversed" and report.bytes_written == full.bytes_written
    dump = DumpFile(tmp_path / "full.dmp")
    data = (tmp_path / "reversed.dmp").read_bytes()
    header_size = len(data) - (report.pages * PAGE_SIZE)
    offset = header_size
    for base, count in dump.runs[::-1].tolist():
        # The same pages as the full dump's, CONTEXT overlays included, in the format's order.
        assert data[offset:offset + count * PAGE_SIZE] == dump.read(base * PAGE_SIZE, count * PAGE_SIZE)
        offset += count * PAGE_SIZE


def test_an_unknown_output_format_is_refused_before_anything_is_read(tmp_path):
    events: list[str] = []
    with pytest.raises(WindumpError, match=r"^no plugin writes the output format 'bitmap'; the formats offered: full$"):
        save(RecordingSource(events), tmp_path / "guest.dmp", output_format="bitmap")
    assert events == [] and os.listdir(tmp_path) == []


class Raising(OutputFormat):
    name = "raising"
    summary = "raises"

    def layout(self, header, runs):
        raise ValueError("no layout")


class Wrong(OutputFormat):
    name = "wrong"
    summary = "returns a tuple"

    def layout(self, header, runs):
        return (header_bytes(header), runs)


@pytest.mark.parametrize("name, message", [
    ("raising", r"^output format raising failed: ValueError: no layout$"),
    ("wrong", r"^output format wrong failed: layout returned tuple, not a Layout$"),
])
def test_a_failing_output_format_is_named(tmp_path, name, message):
    plugins = plugins_with(("formats", Formats(Raising(), Wrong())))
    with pytest.raises(PluginError, match=message):
        save(SampleSource(CrashedGuest(**GUEST)), tmp_path / "guest.dmp", plugins=plugins, output_format=name)
    assert os.listdir(tmp_path) == []


def test_a_second_format_of_the_same_name_is_warned_about_and_the_first_kept():
    messages: list[str] = []
    plugins = Plugins(warn=messages.append)
    plugins.register(Formats(Reversed()), "one")
    plugins.register(Formats(Reversed(), Raising()), "two")
    formats = plugins.output_formats()
    assert sorted(formats) == ["raising", "reversed"]
    assert messages == ["output format reversed is offered twice; the first plugin asked keeps it"]
