"""The ``sample:`` source opened the way windump opens any source: through the plugin hooks."""

from __future__ import annotations

import re
import struct
from importlib.metadata import entry_points

import pluggy
import pytest

from windump_plugins import hookspecs
from windump_plugins.errors import SourceError, WindumpWarning
from windump_plugins.guest.model import STAMP_MAGIC, CrashedGuest
from windump_plugins.source import Access, MemorySource
from windump_plugins.sources import sample
from windump_plugins.sources.sample import OPTIONS, open_sample


@pytest.fixture()
def plugins() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(sample)
    manager.check_pending()
    return manager


def open_location(plugins: pluggy.PluginManager, location: str) -> MemorySource | None:
    return plugins.hook.windump_open_location(location=location)


def test_registered_under_the_windump_entry_point_group():
    assert entry_points(group="windump")["sample"].load() is sample


def test_opens_and_serves_the_model(plugins):
    with open_location(plugins, "sample:") as source:
        guest = CrashedGuest()
        assert isinstance(source, sample.SampleSource) and source.description == "sample:"
        assert source.ram.tolist() == guest.ram.tolist()
        assert source.vmcoreinfo() == guest.note and source.vmcoreinfo()[12:22] == b"VMCOREINFO"
        assert source.read(0x300000, 16) == struct.pack("<QQ", 0x300, STAMP_MAGIC)
        assert source.read(guest.image_base, 8) == b"WDBOOT01"
        assert [cpu.registers for cpu in source.cpus()] == [cpu.registers for cpu in guest.cpu_states]
        source.cpus()[0].registers["rax"] = 0
        assert source.cpus()[0].registers["rax"] == guest.cpu_states[0].registers["rax"]
        source.check_range(0x100000, 0x1000)
        with pytest.raises(SourceError):
            source.read(0xA0000, 1)


def test_options(plugins):
    source = open_location(plugins, "sample:?cpus=4&encoded&bugcheck=0x1E")
    header = source.guest.header
    assert len(source.cpus()) == int(header["NumberProcessors"]) == 4
    assert int(header["BugCheckParameter1"]) == source.guest.decoded_kdbg_address != source.guest.kdbg_address
    assert source.guest.bugcheck_code == 0x1E
    big = open_location(plugins, "sample:?ram=5G")
    assert int(big.ram[-1, 1]) == 6 << 30
    assert big.read((6 << 30) - 0x1000, 8) == struct.pack("<Q", ((6 << 30) - 0x1000) >> 12)
    assert open_location(plugins, "sample:?").ram.tolist() == CrashedGuest().ram.tolist()


def test_declared_defaults_are_the_models():
    """The defaults help shows are the ones the model really takes when an option is absent."""
    guest = CrashedGuest()
    assert (guest.cpu_count, guest.bugcheck_code) == (int(OPTIONS[0].default), int(OPTIONS[3].default, 0))
    assert [option.name for option in OPTIONS] == ["cpus", "encoded", "ram", "bugcheck"]


def test_old_comma_form_warns_and_means_the_same(plugins):
    with pytest.warns(WindumpWarning, match=r"^sample:cpus=3,encoded: options after sample: are a query string "
                                            r"now: write sample:\?cpus=3&encoded$"):
        old = open_location(plugins, "sample:cpus=3,encoded")
    new = open_location(plugins, "sample:?cpus=3&encoded")
    assert old.guest.note == new.guest.note and len(old.cpus()) == 3
    with pytest.warns(WindumpWarning), pytest.raises(SourceError, match=r"^sample:cpus: option 'cpus' needs a value"):
        open_location(plugins, "sample:cpus")


@pytest.mark.parametrize("location, complaint", [
    ("sample:?colour=blue", "unknown option 'colour'; the options are cpus=N, encoded, ram=SIZE, bugcheck=CODE"),
    ("sample:?encoded=yes", "option 'encoded' takes no value: write ?encoded"),
    ("sample:?cpus", "option 'cpus' needs a value: cpus=N"),
    ("sample:?cpus=2&cpus=3", "option 'cpus' is given twice"),
    ("sample:?cpus=two", "bad option value cpus='two': expected a whole number"),
    ("sample:?cpus=9", "1 to 8 vCPUs"),
    ("sample:?ram=5T", "bad option value ram='5T': unknown size unit 'T'"),
    ("sample:?ram=1M", "legacy hole"),
])
def test_rejects_bad_options_with_one_line(plugins, location, complaint):
    with pytest.raises(SourceError, match=re.escape(complaint)) as raised:
        open_location(plugins, location)
    assert "\n" not in str(raised.value) and str(raised.value).startswith(f"{location}: ")


def test_leaves_other_locations_alone(plugins):
    assert open_location(plugins, "gdb://127.0.0.1:1234") is None
    assert open_location(plugins, "samples/guest.elf") is None


def test_source_kinds(plugins):
    [[kind]] = plugins.hook.windump_source_kinds()
    assert kind.pattern == "sample:[?OPTIONS]" and kind.options == OPTIONS


def test_access_names_the_model():
    assert open_sample("sample:").access() == Access("model")
