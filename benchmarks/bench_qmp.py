"""Benchmark: ``windump save qmp:`` of a live QEMU guest against QEMU's own ``dump-guest-memory -w``
on the same guest, in time and in how long each keeps the guest paused.

Boots the test guest of ``drivers/`` (``--size`` RAM, 4 GiB by default: 1 GiB of it above 4 GiB)
under QEMU with its RAM in a shared ``memory-backend-file`` under /dev/shm, lets it run, then for
each memory path of the qmp source (``shm``, ``procmem``, ``stream``) and for QEMU's ``-w`` writes
the dump into the same directory, each followed by ``sync`` inside its timing, ``--repeat`` rounds in
turn, each round starting with another job (the disk of a small VM varies a lot from run to run:
the table shows medians). windump's pause ends when guest RAM has been read; QEMU's lasts its whole
dump. Prints a table and JSON.

    python benchmarks/bench_qmp.py                 # 4 GiB guest
    python benchmarks/bench_qmp.py --size 256M --json out.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "qemu"))

from scratch import in_scratch_directory, publish  # noqa: E402  (beside this script)
from qemu_guest import Machine, QemuGuest, build_guest, missing_tools, parse_ram  # noqa: E402

from windump_plugins.guest.model import CrashedGuest  # noqa: E402
from windump_plugins.plugins import load_plugins  # noqa: E402
from windump_plugins.save import save  # noqa: E402
from windump_plugins.sources.qmp import MEMORY_PATHS, QmpSource  # noqa: E402


def synced(action) -> float:
    """Seconds for ``action()`` and the ``sync`` after it."""
    started = time.perf_counter()
    action()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - started


def idle_ram(machine: Machine, workdir: Path):
    probe = QemuGuest(Machine(machine.machine, machine.memory, 1), workdir / "probe")
    try:
        probe.start()
        return parse_ram(probe.hmp("info mtree -f"))
    finally:
        probe.kill()


#: Loaded once, before any source opens, as the command line does: not while the guest is paused.
PLUGINS = load_plugins(core_only=True)


def windump_round(qemu: QemuGuest, path: str, output: Path) -> tuple[float, float]:
    """``save`` through a fresh qmp source on ``path``: seconds with sync, and seconds paused."""
    qemu.qmp.close()
    qemu.qmp = None
    source = QmpSource(str(qemu.qmp_path), memory=path, timeout=60)
    try:
        seconds = synced(lambda: save(source, output, plugins=PLUGINS))
    finally:
        source.close()
        qemu._connect_qmp()
    paused = source.access().paused_seconds
    return seconds, paused if paused is not None else 0.0


def run(memory: str, directory: Path, paths: list[str], repeat: int) -> dict:
    """Boot the guest once, then ``repeat`` rounds of every windump path and QEMU's ``-w`` in turn;
    each entry keeps every round's figures and their medians."""
    machine = Machine("pc", memory, 2)
    kernel = build_guest(directory / "build")
    model = CrashedGuest(ram=idle_ram(machine, directory), cpus=machine.cpus)
    qemu = QemuGuest(machine, directory / "guest", kernel, model.image)
    mem_path = f"/dev/shm/windump-bench-{os.getpid()}"
    qemu.command += ["-object", f"memory-backend-file,id=ram,size={memory},mem-path={mem_path},share=on",
                     "-machine", "memory-backend=ram"]
    rounds: dict[str, list[dict]] = {}
    try:
        print(f"booting a {memory} guest...", file=sys.stderr)
        qemu.boot()
        qemu.wait_halted()
        output = directory / "guest.dmp"
        synced(lambda: qemu.dump(output))  # untimed: the first dump after boot ran 2-4 s slower, whoever wrote it
        output.unlink()
        jobs = [*paths, "qemu_w"]
        for turn in range(repeat):
            for name in jobs[turn % len(jobs):] + jobs[:turn % len(jobs)]:  # no job always goes first
                qemu.execute("cont")
                if name == "qemu_w":
                    seconds = synced(lambda: qemu.dump(output))  # QEMU pauses the guest for its whole dump
                    paused = qemu.last_dump_seconds
                else:
                    seconds, paused = windump_round(qemu, name, output)
                rounds.setdefault(name, []).append(
                    {"seconds": seconds, "paused_seconds": paused, "dump_bytes": output.stat().st_size})
                output.unlink()
                subprocess.run(["sync"], check=True)  # the freed blocks' discard, outside every timing
    finally:
        qemu.kill()
        Path(mem_path).unlink(missing_ok=True)
    figures: dict = {"guest_ram_bytes": machine.size, "repeat": repeat, "windump": {}}
    for name, results in rounds.items():
        entry = {key: statistics.median(r[key] for r in results) for key in ("seconds", "paused_seconds")}
        entry.update(dump_bytes=results[0]["dump_bytes"], rounds=results,
                     mb_per_second=results[0]["dump_bytes"] / entry["seconds"] / 1e6)
        if name == "qemu_w":
            figures["qemu_w"] = entry
        else:
            figures["windump"][name] = entry
    return figures


def table(figures: dict) -> str:
    rows = [("guest RAM", f"{figures['guest_ram_bytes'] / (1 << 30):.2f} GiB")]
    for name, result in [*((f"windump qmp ({p})", r) for p, r in figures["windump"].items()),
                         ("QEMU dump-guest-memory -w", figures["qemu_w"])]:
        rows.append((name, f"{result['seconds']:.2f} s incl. sync ({result['mb_per_second']:.0f} MB/s), "
                           f"guest paused {result['paused_seconds']:.2f} s (medians)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="4G", help="guest RAM as QEMU's -m takes it, M or G suffix (default 4G)")
    parser.add_argument("--paths", default=",".join(MEMORY_PATHS), help="memory paths to time (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every path and QEMU's -w (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    parser.add_argument("--dir", type=Path, help="where the dumps go (default: a temporary directory)")
    args = parser.parse_args(argv)
    if missing_tools():
        raise SystemExit(f"bench_qmp: needs {', '.join(missing_tools())}")
    paths = args.paths.split(",")
    figures = in_scratch_directory("windump-bench-qmp-", args.dir,
                                   lambda directory: run(args.size, directory, paths, args.repeat))
    publish(figures, table(figures), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
