"""The gate of tests/gate.py and conftest.py, run in an inner pytest: a missing tool skips its test,
and under ``WINDUMP_REQUIRE_QEMU=1`` that skip, and any other, is a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

pytest_plugins = ["pytester"]

INNER_TESTS = '''
import sys

import pytest
import gate
from gate import require


def test_missing_program(monkeypatch):
    monkeypatch.setitem(gate.PROGRAMS, "no-such-program-here", "no-such-package")
    require("no-such-program-here")


def test_present_program(monkeypatch):
    monkeypatch.setitem(gate.PROGRAMS, sys.executable, "python3")
    require(sys.executable)


def test_ad_hoc_skip():
    pytest.skip("ad hoc")


@pytest.mark.skipif(True, reason="a mark")
def test_skipif_mark():
    pass
'''


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((HERE / "conftest.py").read_text())
    pytester.makepyfile(gate=(HERE / "gate.py").read_text(), test_inner=INNER_TESTS)
    return pytester


def test_without_ci_a_missing_tool_skips_and_says_which(inner, monkeypatch):
    monkeypatch.delenv("WINDUMP_REQUIRE_QEMU", raising=False)
    result = inner.runpytest_subprocess("-ra")
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(["*no-such-program-here is not on PATH (Debian package no-such-package)*"])


def test_under_ci_every_skip_fails(inner, monkeypatch):
    monkeypatch.setenv("WINDUMP_REQUIRE_QEMU", "1")
    result = inner.runpytest_subprocess("-ra")
    result.assert_outcomes(passed=1, failed=2, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_skipif_mark*",
        "skipped under WINDUMP_REQUIRE_QEMU=1, where nothing may skip: Skipped: a mark",
        "*test_missing_program*",
        "no-such-program-here is not on PATH (Debian package no-such-package) (WINDUMP_REQUIRE_QEMU=1: nothing may skip)",
        "*test_ad_hoc_skip*",
        "skipped under WINDUMP_REQUIRE_QEMU=1, where nothing may skip: Skipped: ad hoc",
    ])
    assert result.ret != 0
