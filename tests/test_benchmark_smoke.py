"""The conversion benchmark's quick mode runs, and what it reports is what happened: the sizes are
those of the ELF and the dump of its 64 MiB guest (made again here), the timings fit in the run's
wall time, and the sampled RssAnon of the windump process is real and stays under its bound (no
speed assertions: CI machines vary too much)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from elfmaker import write_qemu_elf

from windump_plugins.dumpfile import DumpFile
from windump_plugins.formats.dumpheader import PAGE_SIZE, X64
from windump_plugins.guest.model import CrashedGuest, pc_ram
from windump_plugins.verify import verify_dump

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_convert.py"
QUICK_RAM = 64 << 20


def test_quick_benchmark_reports_what_it_measured(tmp_path, run_windump):
    figures_path = tmp_path / "figures.json"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", str(figures_path), "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["figures.json"]  # nothing left behind
    figures = json.loads(figures_path.read_text())
    assert json.loads(result.stdout[result.stdout.index("{"):]) == figures

    # The files it measured, made again: the ELF dump-guest-memory gives for a 64 MiB pc guest (the
    # benchmark fills its pages, which changes no size) and the dump windump saves from it.
    assert figures["guest_ram_bytes"] == QUICK_RAM
    elf = tmp_path / "guest.elf"
    write_qemu_elf(elf, CrashedGuest(ram=pc_ram(QUICK_RAM)))
    assert run_windump("save", "-q", str(elf), "guest.dmp").returncode == 0
    dump = tmp_path / "guest.dmp"
    with DumpFile(dump) as saved:
        pages = int(saved.header["PhysicalMemoryBlock"]["NumberOfPages"])
    assert verify_dump(dump) == []
    assert figures["elf_bytes"] == elf.stat().st_size
    assert figures["dump_bytes"] == dump.stat().st_size == X64.size + pages * PAGE_SIZE

    # Every timed run happened within this one.
    assert len(figures["windump_seconds"]) == len(figures["cp_seconds"]) == figures["repeat"] == 3
    assert all(seconds > 0 for seconds in figures["windump_seconds"] + figures["cp_seconds"])
    assert sum(figures["windump_seconds"]) + sum(figures["cp_seconds"]) < elapsed

    # RssAnon, sampled from /proc while windump ran: no more than the kernel's peak RSS of that
    # process, under the 150 MiB target, and far from holding the guest (memory stays flat).
    peak = figures["peak_rss_anon_bytes"]
    assert 0 < peak <= figures["max_rss_bytes"]
    assert peak < figures["targets"]["rss_anon_mib"] << 20
    assert peak < QUICK_RAM // 2
    assert figures["meets_targets"]["rss_anon"] is True
    assert re.search(rf"^peak RssAnon +{peak / (1 << 20):.1f} MiB ", result.stdout, re.M), result.stdout
