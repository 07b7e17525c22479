"""What ``python -m windump_plugins`` does before a command runs: its signal handlers come before
any slow import, so a signal while starting gives one line and 128 + N, never a traceback; and the
working directory is off sys.path, so nothing planted there loads as a plugin."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from corpus import BUILT_IN_PLUGINS

#: Put first on sys.path through PYTHONPATH: stops the import of $STOP_AT_IMPORT, reports it on the
#: events pipe and waits on the go pipe, so the test can signal windump in the middle of starting.
STOP_AT_IMPORT = '''
import os
import sys

class StopAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["STOP_AT_IMPORT"]:
            sys.meta_path.remove(self)
            os.write(int(os.environ["STOP_EVENTS_FD"]), name.encode() + b"\\n")
            os.read(int(os.environ["STOP_GO_FD"]), 1)
        return None

sys.meta_path.insert(0, StopAtImport())
'''


def windump(*args: str, cwd: Path, env: dict[str, str], **popen) -> subprocess.Popen:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("WINDUMP_")}
    environ.update(env)
    return subprocess.Popen([sys.executable, "-m", "windump_plugins", *args], cwd=cwd, env=environ,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


@pytest.mark.parametrize("module", ["importlib.metadata", "windump_plugins.frontends.cli", "numpy", "pluggy"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda signum: signum.name)
def test_a_signal_while_starting_is_one_line(tmp_path, module, signum):
    """Before the fix, importlib.metadata came in through the package's __init__, before any handler."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_AT_IMPORT)
    events, events_writer = os.pipe()
    go_reader, go = os.pipe()
    process = windump("save", "sample:", "guest.dmp", cwd=tmp_path, pass_fds=(events_writer, go_reader),
                      env={"WINDUMP_PLUGINS": BUILT_IN_PLUGINS, "PYTHONPATH": str(hook), "STOP_AT_IMPORT": module,
                           "STOP_EVENTS_FD": str(events_writer), "STOP_GO_FD": str(go_reader)})
    os.close(events_writer)
    os.close(go_reader)
    try:
        assert os.read(events, 100) == module.encode() + b"\n", process.communicate()
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        os.close(events)
        os.close(go)
    line = "windump: interrupted" if signum == signal.SIGINT else f"windump: interrupted by {signum.name}"
    assert (process.returncode, out, err) == (128 + signum, "", line + "\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hook"]


def test_a_plugin_planted_in_the_working_directory_is_not_loaded(tmp_path):
    """``python -m`` puts the working directory first on sys.path: a .dist-info there would load as
    a plugin, and even take a built-in plugin's name."""
    marker = tmp_path / "imported"
    (tmp_path / "planted-1.0.dist-info").mkdir()
    (tmp_path / "planted-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: planted\nVersion: 1.0\n")
    (tmp_path / "planted-1.0.dist-info" / "entry_points.txt").write_text(
        "[windump]\nplanted = windump_planted\nelf = windump_planted\n")
    (tmp_path / "windump_planted.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    process = windump("plugins", cwd=tmp_path, env={"WINDUMP_PLUGINS": f"{BUILT_IN_PLUGINS},planted"})
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert err == "windump: warning: WINDUMP_PLUGINS names plugin planted, but no installed plugin has that name\n"
    assert not marker.exists()
    assert re.search(r"^elf  windump \S+  windump_plugins\.sources\.elf$", out, re.M), out
    assert "planted" not in out


def test_python_dash_p_keeps_sys_path_whole(tmp_path):
    """``python -P`` leaves the working directory off sys.path itself: then nothing is taken off."""
    result = subprocess.run([sys.executable, "-P", "-c", "import sys; before = list(sys.path); "
                             "from windump_plugins.__main__ import forget_working_directory; "
                             "forget_working_directory(); print(sys.path == before)"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "True\n", "")
