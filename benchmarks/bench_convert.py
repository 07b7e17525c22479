"""Benchmark: ``windump save`` of a QEMU ELF against ``cp`` of the same file, in time and memory.

Writes the ELF that ``dump-guest-memory`` would give for a model guest of ``--size`` RAM (every
stamped page filled with non-zero bytes, so neither side gains from holes or zero pages), warms the
page cache with one untimed read, then alternates ``windump save`` and ``cp``, each followed by
``sync`` inside its timing, ``--repeat`` times. Reports the median time ratio windump/cp and the
peak RssAnon of the windump process (sampled from ``/proc/PID/status``), as a table and as JSON.

    python benchmarks/bench_convert.py                      # 4 GiB guest
    python benchmarks/bench_convert.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from scratch import in_scratch_directory, publish  # noqa: E402  (beside this script)
from elfmaker import write_qemu_elf  # noqa: E402  (the test suite's QEMU ELF writer)

from windump_plugins.formats.dumpheader import PAGE_SHIFT, PAGE_SIZE  # noqa: E402
from windump_plugins.guest.model import CrashedGuest, pc_ram  # noqa: E402

#: What windump should reach: no slower than cp, and flat memory whatever the guest size.
TARGET_RATIO = 1.0
TARGET_RSS_ANON_MIB = 150

QUICK_SIZE = 64 << 20
SAMPLE_INTERVAL = 0.005
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4G``, ``4GiB``, ``512MiB``, ``65536`` (bytes) -> bytes, a whole number of pages."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.I)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GiB or 512MiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 16 << 20 or size % PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r}: the guest needs at least 16 MiB, in whole pages")
    return size


class FilledGuest:
    """A CrashedGuest whose stamped pages carry non-zero filler after their 16-byte stamp, as a
    busy guest's RAM would; the kernel image and page tables are left exactly as the model has them."""

    def __init__(self, guest: CrashedGuest):
        self.guest = guest
        self.ram = guest.ram
        self.cpu_states = guest.cpu_states
        self.note = guest.note
        self.filler = np.random.default_rng(0x57D).integers(1, 256, PAGE_SIZE - 16, dtype=np.uint8)

    def readinto(self, address: int, buffer: memoryview) -> None:
        self.guest.readinto(address, buffer)
        if address % PAGE_SIZE or len(buffer) % PAGE_SIZE:
            raise ValueError("FilledGuest reads whole pages only")
        pages = np.frombuffer(buffer, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        starts = (np.arange(len(pages), dtype=np.uint64) << np.uint64(PAGE_SHIFT)) + np.uint64(address)
        ranges = self.guest.stamp_ranges
        i = np.searchsorted(ranges[:, 0], starts, side="right") - 1
        stamped = (i >= 0) & (starts < ranges[np.maximum(i, 0), 1])
        pages[stamped, 16:] = self.filler


def rss_anon(pid: int) -> int:
    """The process's RssAnon in bytes, 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) << 10
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Run ``argv`` then ``sync``; return (seconds for both, peak sampled RssAnon, ru_maxrss bytes)."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
    peak = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, rss_anon(process.pid))
        time.sleep(SAMPLE_INTERVAL)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"bench_convert: {' '.join(argv)} exited with status {process.returncode}")
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - started, peak, usage.ru_maxrss << 10


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    subprocess.run(["sync"], check=True)


def run(size: int, repeat: int, directory: Path) -> dict:
    elf, dump, copy = directory / "guest.elf", directory / "guest.dmp", directory / "guest-copy.elf"
    print(f"writing {elf} ({size >> 20} MiB guest)...", file=sys.stderr)
    write_qemu_elf(elf, FilledGuest(CrashedGuest(ram=pc_ram(size))))
    subprocess.run(["sync"], check=True)  # the ELF's own writeback must not land in the first timing
    with open(elf, "rb") as warm:  # untimed read: both sides start from a warm page cache
        while warm.read(64 << 20):
            pass
    env = {**os.environ, "WINDUMP_PLUGINS": "elf"}
    windump = [sys.executable, "-m", "windump_plugins", "save", "-q", str(elf), str(dump)]
    cp = ["cp", str(elf), str(copy)]
    windump_seconds, cp_seconds, peaks, max_rss = [], [], [], []
    for _ in range(repeat):
        seconds, peak, maxrss = timed(windump, env)
        dump_bytes = dump.stat().st_size
        windump_seconds.append(seconds)
        peaks.append(peak)
        max_rss.append(maxrss)
        remove(dump)
        cp_seconds.append(timed(cp)[0])
        remove(copy)
    windump_median, cp_median = statistics.median(windump_seconds), statistics.median(cp_seconds)
    ratio = windump_median / cp_median
    peak = max(peaks)
    return {
        "guest_ram_bytes": size,
        "elf_bytes": elf.stat().st_size,
        "dump_bytes": dump_bytes,
        "repeat": repeat,
        "windump_seconds": windump_seconds,
        "cp_seconds": cp_seconds,
        "windump_median_seconds": windump_median,
        "cp_median_seconds": cp_median,
        "ratio": ratio,
        "windump_mb_per_second": dump_bytes / windump_median / 1e6,
        "peak_rss_anon_bytes": peak,
        "peak_rss_anon_mib": peak / (1 << 20),
        "max_rss_bytes": max(max_rss),
        "targets": {"ratio": TARGET_RATIO, "rss_anon_mib": TARGET_RSS_ANON_MIB},
        "meets_targets": {"ratio": ratio <= TARGET_RATIO, "rss_anon": peak < TARGET_RSS_ANON_MIB << 20},
    }


def table(figures: dict) -> str:
    rows = [
        ("guest RAM", f"{figures['guest_ram_bytes'] / (1 << 30):.2f} GiB"),
        ("windump save (median)", f"{figures['windump_median_seconds']:.2f} s"
                                  f" ({figures['windump_mb_per_second']:.0f} MB/s)"),
        ("cp (median)", f"{figures['cp_median_seconds']:.2f} s"),
        ("ratio windump/cp", f"{figures['ratio']:.2f} (target <= {TARGET_RATIO})"),
        ("peak RssAnon", f"{figures['peak_rss_anon_mib']:.1f} MiB (target < {TARGET_RSS_ANON_MIB})"),
        ("peak RSS (ru_maxrss)", f"{figures['max_rss_bytes'] / (1 << 20):.1f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=4 << 30, help="guest RAM, e.g. 4GiB or 512MiB (default 4GiB)")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_SIZE >> 20} MiB guest, for CI")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each command (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    parser.add_argument("--dir", type=Path, help="where the ELF and its copies go (default: a temporary directory)")
    args = parser.parse_args(argv)
    size = QUICK_SIZE if args.quick else args.size
    figures = in_scratch_directory("windump-bench-", args.dir, lambda directory: run(size, args.repeat, directory))
    publish(figures, table(figures), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
