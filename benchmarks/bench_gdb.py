"""Benchmark: ``windump-save`` inside gdb against gdb's own ``dump binary memory`` of the same RAM,
over the same QEMU gdbstub, in one gdb session.

Boots the test guest of ``drivers/`` (``--size`` RAM, 1 GiB by default), halts it, then in one
``gdb -batch`` attached to its gdbstub times, each followed by ``sync``: ``windump-save`` through
QEMU's process memory, ``windump-save --packets`` (``m`` requests pipelined on gdb's socket),
and ``dump binary memory`` of each run of the dump's header, the same RAM (physical, PhyMemMode 1). Prints
a table and the speed-ups; ``--json`` writes the figures.

    python benchmarks/bench_gdb.py
    python benchmarks/bench_gdb.py --size 256M --json out.json
    TMPDIR=/dev/shm python benchmarks/bench_gdb.py     # files on tmpfs: the reads, not the disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "qemu"))

from qemu_guest import Machine, QemuGuest, build_guest, missing_tools  # noqa: E402

from windump_plugins.guest.model import CrashedGuest  # noqa: E402

#: Runs inside gdb: each method timed with a sync after it; JSON on the last line.
GDB_DRIVER = r'''
import json, subprocess, time
import gdb
from windump_plugins.dumpfile import DumpFile

def timed(command):
    started = time.perf_counter()
    gdb.execute(command, to_string=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - started

figures = {
    "windump-save (process memory)": timed("windump-save --force DIRECTORY/procmem.dmp"),
    "windump-save --packets": timed("windump-save --force --packets DIRECTORY/packets.dmp"),
}
with DumpFile("DIRECTORY/procmem.dmp") as dump:  # the same RAM windump wrote: the header's runs
    ram = [(base << 12, (base + count) << 12) for base, count in dump.runs.tolist()]
gdb.execute("maint packet Qqemu.PhyMemMode:1", to_string=True)
try:
    started = time.perf_counter()
    for index, (start, end) in enumerate(ram):
        gdb.execute(f"dump binary memory DIRECTORY/gdb-{index}.bin {start:#x} {end:#x}", to_string=True)
    subprocess.run(["sync"], check=True)
    figures["gdb dump binary memory"] = time.perf_counter() - started
finally:
    gdb.execute("maint packet Qqemu.PhyMemMode:0", to_string=True)
figures["ram bytes"] = sum(end - start for start, end in ram)
print("BENCH " + json.dumps(figures))
'''


def run(memory: str, directory: Path) -> dict:
    machine = Machine("pc", memory, 2)
    kernel = build_guest(directory / "build")
    probe = QemuGuest(Machine(machine.machine, machine.memory, 1), directory / "probe")
    try:
        probe.start()
        ram = probe.ram()
    finally:
        probe.kill()
    model = CrashedGuest(ram=ram, cpus=machine.cpus)
    qemu = QemuGuest(machine, directory / "guest", kernel, model.image)
    try:
        qemu.boot()
        qemu.wait_halted()
        qemu.execute("stop")
        driver = directory / "driver.py"
        driver.write_text(GDB_DRIVER.replace("DIRECTORY", str(directory)))
        environ = {**os.environ, "VIRTUAL_ENV": sys.prefix}
        result = subprocess.run(["gdb", "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{qemu.gdb_port}",
                                 "-x", str(ROOT / "gdb" / "windump.py"), "-x", str(driver)],
                                capture_output=True, text=True, env=environ)
        lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH ")]
        if not lines:
            raise SystemExit(f"gdb failed:\n{result.stdout}\n{result.stderr}")
        return json.loads(lines[-1].removeprefix("BENCH "))
    finally:
        qemu.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="guest RAM, e.g. 256M or 1G (default 1G)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    missing = missing_tools() + ([] if shutil.which("gdb") else ["gdb"])
    if missing:
        raise SystemExit(f"needs {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="windump-bench-gdb-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        figures = run(args.size, Path(tmp))
    size = figures.pop("ram bytes")
    baseline = figures["gdb dump binary memory"]
    print(f"guest RAM {size / 2**20:.0f} MiB, each run followed by sync")
    for name, seconds in figures.items():
        print(f"  {name:<32} {seconds:7.2f} s  {size / seconds / 2**20:7.0f} MiB/s  {baseline / seconds:6.1f}x gdb")
    if args.json:
        args.json.write_text(json.dumps({"ram_bytes": size, "seconds": figures}, indent=2))


if __name__ == "__main__":
    main()
