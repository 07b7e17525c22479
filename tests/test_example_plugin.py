"""The example third-party plugin in ``examples/windump-raw``: installed with pip into a fresh
virtualenv beside windump it is listed by ``windump plugins`` and turns a raw RAM image of the
sample guest into a dump that ``windump verify`` accepts; registered inline, its map parsing, note
scan and errors are checked in-process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from windump_plugins.dumpfile import DumpFile
from windump_plugins.errors import FormatError, SourceError, WindumpError
from windump_plugins.guest.model import CrashedGuest
from windump_plugins.headers.published import NO_NOTE_MESSAGE
from windump_plugins.errors import WindumpWarning
from windump_plugins.plugins import Plugins
from windump_plugins.save import save
from windump_plugins.verify import verify_dump
from windump_plugins.notescan import scan_for_note

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "windump-raw"

#: Bytes of junk before the first block and between blocks, so a map that is ignored shows.
JUNK = 0x3000


def write_raw_image(guest: CrashedGuest, directory: Path) -> tuple[Path, Path]:
    """The guest's RAM blocks in a file in reverse order with junk around them, and the map that
    places them: what a RAM map is for."""
    image, ram_map = directory / "guest.raw", directory / "guest.map"
    offset = JUNK
    with open(image, "wb") as file, open(ram_map, "w") as lines:
        file.write(b"\xee" * JUNK)
        lines.write("# GUEST_PHYS_START GUEST_PHYS_END FILE_OFFSET\n")
        for start, end in guest.ram.tolist()[::-1]:
            file.seek(offset)
            file.write(guest.read(start, end - start))
            file.write(b"\xee" * JUNK)
            lines.write(f"{start:x} {end:x} {offset:#x}\n")
            offset += end - start + JUNK
    return image, ram_map


def assert_dump_holds_guest_pages(dump: Path, guest: CrashedGuest) -> None:
    with DumpFile(dump) as pages:
        runs = pages.ram
        assert len(runs) and int((runs[:, 1] - runs[:, 0]).sum()) == 0x1000 * int(guest.windows_runs()[:, 1].sum())
        for start, end in runs.tolist():
            assert pages.read(start, end - start) == guest.read(start, end - start), f"pages {start:#x}-{end:#x} differ"


# -- the installed plugin, in a fresh virtualenv -------------------------------------------------------


@pytest.fixture(scope="module")
def venv_bin(tmp_path_factory) -> Path:
    """A virtualenv without system site-packages holding windump and windump-raw, both installed
    by pip from copies of their sources (so no build/ or egg-info lands in the checkout)."""
    work = tmp_path_factory.mktemp("venv")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    windump = work / "windump"
    windump.mkdir()
    shutil.copy(ROOT / "pyproject.toml", windump)
    shutil.copy(ROOT / "README.md", windump)
    shutil.copytree(ROOT / "windump_plugins", windump / "windump_plugins", ignore=ignore)
    shutil.copytree(ROOT / "gdb", windump / "gdb", ignore=ignore)
    example = shutil.copytree(EXAMPLE, work / "windump-raw", ignore=ignore)
    env = work / "env"
    subprocess.run([sys.executable, "-m", "venv", env], check=True, timeout=120)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for arguments in (["setuptools>=68", "wheel"], ["--no-build-isolation", str(windump), str(example)]):
        install = subprocess.run(pip + arguments, capture_output=True, text=True, timeout=300)
        assert install.returncode == 0, install.stdout + install.stderr
    return env / "bin"


def run(venv_bin: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("WINDUMP_")}
    return subprocess.run([str(venv_bin / "windump"), *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_installed_plugin_is_listed_with_its_version(venv_bin, tmp_path):
    version = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["version"]
    listed = run(venv_bin, "plugins", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert f"raw  windump-raw {version}  windump_raw.plugin" in listed.stdout.splitlines()
    assert "raw:PATH" in listed.stdout
    assert not listed.stderr


def test_installed_plugin_saves_a_raw_image_as_a_verified_dump(venv_bin, tmp_path):
    guest = CrashedGuest(cpus=3, encoded_kdbg=True)
    image, ram_map = write_raw_image(guest, tmp_path)
    saved = run(venv_bin, "save", "-q", f"raw:{image}?map={ram_map}", "guest.dmp", cwd=tmp_path)
    assert saved.returncode == 0, saved.stderr
    checked = run(venv_bin, "verify", "guest.dmp", cwd=tmp_path)
    assert checked.stdout == "guest.dmp: ok\n", checked.stdout + checked.stderr
    assert_dump_holds_guest_pages(tmp_path / "guest.dmp", guest)


# -- the plugin registered inline, as a plugin's own tests would do it -----------------------------------


@pytest.fixture
def plugins(monkeypatch) -> Plugins:
    """A plugin manager with only the example plugin, imported from examples/ and registered inline."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from windump_raw import plugin

    manager = Plugins()
    manager.register(plugin, "raw")
    try:
        yield manager
    finally:
        manager.unregister("raw")


def test_mapped_image_with_note_file_reads_as_the_guest(plugins, tmp_path):
    guest = CrashedGuest()
    image, ram_map = write_raw_image(guest, tmp_path)
    (tmp_path / "note").write_bytes(guest.note)
    with plugins.open_source(f"raw:{image}?map={ram_map}&note={tmp_path / 'note'}") as source:
        assert source.ram.tolist() == guest.ram.tolist()
        assert source.vmcoreinfo() == guest.note
        with pytest.warns(WindumpWarning, match="gives no vCPU registers"):  # a raw image has none
            save(source, tmp_path / "guest.dmp")
        # Guest memory comes out of the image as file extents, for copy_file_range; the highest
        # block is the image's first.
        start, end = guest.ram[-1].tolist()
        extents = source.file_extents(start, end - start)
        assert [(extent.offset, extent.length) for extent in extents] == [(JUNK, end - start)]
    assert verify_dump(tmp_path / "guest.dmp") == []
    assert_dump_holds_guest_pages(tmp_path / "guest.dmp", guest)


def test_image_without_map_is_ram_from_zero_and_its_note_is_found(plugins, tmp_path):
    guest = CrashedGuest(cpus=1)
    end = int(guest.ram[-1, 1])
    flat = bytearray(end)
    for start, stop in guest.ram.tolist():
        flat[start:stop] = guest.read(start, stop - start)
    (tmp_path / "flat.raw").write_bytes(flat)
    with plugins.open_source(f"raw:{tmp_path / 'flat.raw'}") as source:
        assert source.ram.tolist() == [[0, end]]
        assert source.vmcoreinfo() == guest.note
        with pytest.warns(WindumpWarning, match="gives no vCPU registers"):  # a raw image has none
            save(source, tmp_path / "flat.dmp")
    assert verify_dump(tmp_path / "flat.dmp") == []
    assert_dump_holds_guest_pages(tmp_path / "flat.dmp", guest)


def test_note_scan_finds_a_note_across_chunks_and_only_a_whole_one(plugins, tmp_path):
    guest = CrashedGuest(cpus=1)
    ram = bytearray(0x10000)
    ram[0x1FF0:0x1FF0 + 31] = guest.note[:31]  # one byte short of the note's identifying 32: no note
    ram[0x2FF4:0x2FF4 + len(guest.note)] = guest.note  # its first 32 bytes straddle 0x1000-byte chunks
    (tmp_path / "ram").write_bytes(ram)
    with plugins.open_source(f"raw:{tmp_path / 'ram'}") as source:
        assert scan_for_note(source, chunk_size=0x1000) == (0x2FF4, guest.note)
        assert source.vmcoreinfo() == guest.note


def test_image_without_a_note_stops_with_the_set_up_hint(plugins, tmp_path):
    (tmp_path / "zero.raw").write_bytes(bytes(0x100000))
    with plugins.open_source(f"raw:{tmp_path / 'zero.raw'}") as source, pytest.raises(WindumpError) as error:
        save(source, tmp_path / "zero.dmp")
    assert str(error.value) == NO_NOTE_MESSAGE
    assert not (tmp_path / "zero.dmp").exists()


@pytest.mark.parametrize(("lines", "message"), [
    ("0 1000\n", r"map:1: expected GUEST_PHYS_START GUEST_PHYS_END FILE_OFFSET in hex, got '0 1000'"),
    ("# empty\n", r"the RAM map lists no blocks"),
    ("2000 1000 0\n", r"map:1: block 0x2000-0x1000 at file offset 0x0 is empty or backwards"),
    ("0 2000 0\n1000 3000 0\n", r"blocks 0x0-0x2000 and 0x1000-0x3000 overlap"),
    ("0 1000 0\n100000 102000 f000\n", r"block 0x100000-0x102000 needs file bytes up to 0x11000, the image has 0x10000"),
])
def test_bad_ram_maps_are_one_line_format_errors(plugins, tmp_path, lines, message):
    (tmp_path / "ram").write_bytes(bytes(0x10000))
    (tmp_path / "map").write_text(lines)
    with pytest.raises(FormatError, match=message):
        plugins.open_source(f"raw:{tmp_path / 'ram'}?map={tmp_path / 'map'}")


def test_bad_locations_and_reads_outside_the_map_are_source_errors(plugins, tmp_path):
    (tmp_path / "ram").write_bytes(bytes(0x10000))
    (tmp_path / "map").write_text("100000 104000 4000\n")
    with pytest.raises(SourceError, match="bad option 'size=1'"):
        plugins.open_source(f"raw:{tmp_path / 'ram'}?size=1")
    with pytest.raises(SourceError, match="cannot open"):
        plugins.open_source(f"raw:{tmp_path / 'missing'}")
    with pytest.raises(SourceError, match="cannot read note file"):
        plugins.open_source(f"raw:{tmp_path / 'ram'}?note={tmp_path / 'missing'}")
    with plugins.open_source(f"raw:{tmp_path / 'ram'}?map={tmp_path / 'map'}") as source:
        assert source.read(0x100000, 0x4000) == bytes(0x4000)
        with pytest.raises(SourceError, match="not in guest RAM"):
            source.read(0x103000, 0x2000)
        np.testing.assert_array_equal(source.ram, [[0x100000, 0x104000]])
