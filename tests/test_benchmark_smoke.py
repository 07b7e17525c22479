"""The conversion benchmark's quick mode runs and reports its figures; its memory bound holds (no
timing assertions: CI machines vary too much)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_convert.py"


def test_quick_benchmark_reports_figures_and_flat_memory(tmp_path):
    figures_path = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", str(figures_path), "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(figures_path.read_text())
    assert figures["guest_ram_bytes"] == 64 << 20
    assert len(figures["windump_seconds"]) == len(figures["cp_seconds"]) == figures["repeat"] == 3
    assert all(seconds > 0 for seconds in figures["windump_seconds"] + figures["cp_seconds"])
    assert figures["ratio"] == figures["windump_median_seconds"] / figures["cp_median_seconds"]
    # The dump holds every RAM page the ELF holds, plus its 8 KiB header (less QEMU's BIOS block).
    assert 0x2000 < figures["dump_bytes"] <= figures["elf_bytes"]
    assert 0 < figures["peak_rss_anon_bytes"] < figures["targets"]["rss_anon_mib"] << 20
    assert figures["meets_targets"]["rss_anon"] is True
    assert "peak RssAnon" in result.stdout
    assert [path.name for path in tmp_path.iterdir()] == ["figures.json"]  # nothing left behind
