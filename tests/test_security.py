"""What windump promises about safety: dumps readable only by their owner, temporary files that are
created exclusively and never followed through symlinks, network sources kept to loopback in the
docs, and plugins loaded only from installed entry points."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpus import BUILT_IN_PLUGINS
from windump_plugins import writer
from windump_plugins.errors import WindumpError
from windump_plugins.formats.dumpheader import X64, new_header, set_header_runs
from windump_plugins.source import MemorySource

ROOT = Path(__file__).resolve().parent.parent


def windump(*args: str, cwd: Path, env: dict[str, str] | None = None, umask: int = 0o022,
            pythonpath: str | None = None) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("WINDUMP_")}
    environ.update(env if env is not None else {"WINDUMP_PLUGINS": BUILT_IN_PLUGINS})
    if pythonpath:
        environ["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "windump_plugins", *args], cwd=cwd, env=environ, umask=umask,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


def test_dump_is_0600_under_umask_000(tmp_path):
    result = windump("save", "-q", "sample:", "guest.dmp", cwd=tmp_path, umask=0)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((tmp_path / "guest.dmp").stat().st_mode) == 0o600


@pytest.mark.parametrize("force", [False, True])
def test_symlink_at_the_output_is_not_followed(tmp_path, force):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "guest.dmp").symlink_to(victim)
    result = windump("save", "-q", *(["--force"] if force else []), "sample:", "guest.dmp", cwd=tmp_path)
    assert victim.read_bytes() == b"precious"
    if force:
        assert result.returncode == 0, result.stderr
        output = tmp_path / "guest.dmp"
        assert not output.is_symlink() and output.read_bytes()[:8] == b"PAGEDU64"
        assert stat.S_IMODE(output.stat().st_mode) == 0o600
    else:
        assert (result.returncode, result.stderr) == (1, "windump: error: guest.dmp exists (use --force to overwrite)\n")
        assert os.readlink(tmp_path / "guest.dmp") == str(victim)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest.dmp", "victim"]


class OnePage(MemorySource):
    description = "one page"
    ram = np.array([[0, 0x1000]], dtype=np.uint64)

    def readinto(self, address: int, buffer: memoryview) -> None:
        buffer[:] = b"\xAB" * len(buffer)


@pytest.fixture(params=["unnamed, --force", "no O_TMPFILE"])
def temp_named(request, monkeypatch) -> bool:
    """The two ways a dump takes a temporary name: an unnamed file linked to one before it is
    renamed over OUTPUT (--force), or a temporary file where O_TMPFILE is refused; the ``force`` to use."""
    if request.param == "no O_TMPFILE":
        monkeypatch.setattr(writer, "_TMPFILE", 0)
        return False
    return True


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_planted_temporary_name_is_neither_followed_nor_reused(tmp_path, monkeypatch, planted, temp_named):
    """An attacker who guesses the next temporary name and plants a symlink (or file) there."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    tokens = iter(["guessed", "fresh"])
    monkeypatch.setattr(writer.secrets, "token_hex", lambda n: next(tokens))
    trap = tmp_path / ".guest.dmp.windump-guessed.tmp"
    if planted == "symlink":
        trap.symlink_to(victim)
    else:
        trap.write_bytes(b"planted")
    header = new_header(X64)
    set_header_runs(header, np.array([[0, 1]], dtype=np.uint64))
    writer.write_dump(tmp_path / "guest.dmp", header.tobytes(), np.array([[0, 1]], dtype=np.uint64), OnePage(),
                      force=temp_named)
    assert victim.read_bytes() == b"precious"
    assert trap.is_symlink() if planted == "symlink" else trap.read_bytes() == b"planted"
    assert (tmp_path / "guest.dmp").read_bytes()[0x2000:] == b"\xAB" * 0x1000
    assert not (tmp_path / ".guest.dmp.windump-fresh.tmp").exists()


def test_no_free_temporary_name_is_an_error_not_an_overwrite(tmp_path, monkeypatch, temp_named):
    monkeypatch.setattr(writer.secrets, "token_hex", lambda n: "guessed")
    (tmp_path / ".guest.dmp.windump-guessed.tmp").symlink_to(tmp_path / "victim")
    header = new_header(X64)
    set_header_runs(header, np.array([[0, 1]], dtype=np.uint64))
    with pytest.raises(WindumpError, match="no free temporary name beside it"):
        writer.write_dump(tmp_path / "guest.dmp", header.tobytes(), np.array([[0, 1]], dtype=np.uint64), OnePage(),
                          force=temp_named)
    assert not (tmp_path / "victim").exists() and not (tmp_path / "guest.dmp").exists()


def test_docs_keep_network_sources_on_loopback():
    page = " ".join((ROOT / "docs" / "troubleshooting.rst").read_text().split())
    assert "loopback" in page
    assert "-gdb tcp:127.0.0.1:1234" in page and "tcp:127.0.0.1:4444" in page


def test_a_module_named_like_a_plugin_on_sys_path_is_not_loaded(tmp_path):
    marker = tmp_path / "imported"
    plugins = tmp_path / "path"
    plugins.mkdir()
    for name in ("windump_evil", "windump_plugin_evil", "windump_plugins_evil", "elf", "gdb"):
        (plugins / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    result = windump("plugins", cwd=tmp_path, env={}, pythonpath=str(plugins))
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), marker.read_text()
    assert "evil" not in result.stdout


def test_disabling_the_elf_plugin_makes_elf_files_unreadable(tmp_path):
    (tmp_path / "guest.elf").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57))
    result = windump("save", "guest.elf", "guest.dmp", cwd=tmp_path, env={"WINDUMP_DISABLE_PLUGINS": "elf"})
    assert result.returncode == 1
    assert result.stderr.startswith("windump: error: guest.elf: no plugin reads this file (starts with "
                                    "b'\\x7fELF\\x02\\x01\\x01\\x00'); known sources: ")
    assert "FILE.elf" not in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest.elf"]
