"""Fixtures shared by the test modules, and the rule that under CI (``WINDUMP_REQUIRE_QEMU=1``) no
test may skip: :func:`gate.require` is the one place a test skips for a missing tool, and any skip
that happens anyway (a ``skipif`` mark, ``pytest.skip`` or ``importorskip``) is reported as a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from gate import everything_required
from hypothesis import settings
from gate import require as require_tools

# Property tests judge results, not speed: on 2 shared cores an example can take longer than
# hypothesis's 200 ms deadline. Under CI they are derandomized too, so a red run can be repeated.
settings.register_profile("windump", deadline=None, derandomize=bool(os.environ.get("CI")))
settings.load_profile("windump")

#: The plugins windump itself ships: tests run with these alone, whatever else is installed.
BUILT_IN_PLUGINS = ",".join(
    sorted(ep.name for ep in entry_points(group="windump") if ep.value.startswith("windump_plugins."))
)


@pytest.fixture
def run_windump(tmp_path):
    """Run ``python -m windump_plugins ARGS`` in ``tmp_path`` with only the built-in plugins, as a
    user would run ``windump``; returns the CompletedProcess (text mode)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        environ = {key: value for key, value in os.environ.items() if not key.startswith("WINDUMP_")}
        environ["WINDUMP_PLUGINS"] = BUILT_IN_PLUGINS
        environ.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "windump_plugins", *args],
            cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    return run


@pytest.fixture(scope="session")
def require():
    """:func:`gate.require`, for tests that prefer a fixture: ``require("gdb")``."""
    return require_tools


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under CI, turn a skipped report into a failed one that says what skipped and why."""
    if not everything_required() or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under WINDUMP_REQUIRE_QEMU=1, where nothing may skip: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    _fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report = yield
    _fail_skip(report)
    return report
