"""The dump files a running windump holds open for writing in a directory, found through /proc
whether they have a name (a temporary file) or none (``O_TMPFILE``), and a windump stopped once its
dump has grown: the phase a mid-body fault test acts in."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path


def writing(pid: int, directory: str | os.PathLike) -> list[int]:
    """The size of each regular file in ``directory`` that process ``pid`` has open for writing."""
    where = os.path.realpath(directory)
    sizes = []
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:
        return []
    for descriptor in descriptors:
        try:
            target = os.readlink(descriptor)
            info = Path(f"/proc/{pid}/fdinfo/{descriptor.name}").read_text()
            found = os.stat(descriptor)
        except FileNotFoundError:  # closed meanwhile
            continue
        flags = int(re.search(r"^flags:\s*([0-7]+)", info, re.M).group(1), 8)
        if (stat.S_ISREG(found.st_mode) and flags & os.O_ACCMODE != os.O_RDONLY
                and os.path.dirname(target.removesuffix(" (deleted)")) == where):
            sizes.append(found.st_size)
    return sizes


def stop_midway(process: subprocess.Popen, directory: str | os.PathLike, size: int) -> int:
    """SIGSTOP ``process`` once its dump file in ``directory`` has grown past ``size`` bytes; return
    the dump's size then."""
    deadline = time.monotonic() + 60
    while not any(written > size for written in writing(process.pid, directory)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"the dump never grew past {size} bytes"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGSTOP)
    return max(writing(process.pid, directory))
