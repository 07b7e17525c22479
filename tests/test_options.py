"""One vocabulary: the options each source declares are parsed from locations with one set of
messages, become gdb's ``windump-save`` flags and ``set windump`` settings under the same names, and
the front ends' log lines and access summaries read only what they are given."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest

from windump_plugins.errors import SourceError, WindumpError
from windump_plugins.frontends import gdb as gdbfront
from windump_plugins.frontends.arguments import option_argument
from windump_plugins.frontends.logs import SaveTimer, log_lines
from windump_plugins.frontends.reports import access_text, summary_line
from windump_plugins.location import Option, address, integer, parse_options, seconds
from windump_plugins.save import SaveReport
from windump_plugins.source import Access
from windump_plugins.sources import gdbstub, qmp

ROOT = Path(__file__).resolve().parent.parent

DECLARED = (
    Option("keep", "keep it"),
    Option("header-pa", "where", type=address, metavar="ADDR"),
    Option("timeout", "how long", type=seconds, metavar="S", default="10"),
    Option("memory", "which way", choices=("shm", "stream")),
)


def test_every_option_is_in_the_result_at_its_default():
    assert parse_options("x:", "", DECLARED) == {"keep": False, "header_pa": None, "timeout": 10.0, "memory": None}
    given = parse_options("x:", "keep&&header-pa=0x7FE000&timeout=2.5&memory=stream&", DECLARED)
    assert given == {"keep": True, "header_pa": 0x7FE000, "timeout": 2.5, "memory": "stream"}


def test_values_are_percent_decoded():
    assert parse_options("x:", "header-pa=0x7fe%30%30%30", DECLARED)["header_pa"] == 0x7FE000
    assert parse_options("x:", "%6beep", DECLARED)["keep"] is True


@pytest.mark.parametrize("query, message", [
    ("colour=blue", "x:?q: unknown option 'colour'; the options are keep, header-pa=ADDR, timeout=S, memory=shm|stream"),
    ("keep=yes", "x:?q: option 'keep' takes no value: write ?keep"),
    ("timeout", "x:?q: option 'timeout' needs a value: timeout=S"),
    ("keep&keep", "x:?q: option 'keep' is given twice"),
    ("timeout=soon", "x:?q: bad option value timeout='soon': expected a number of seconds above 0, such as 2.5"),
    ("timeout=0", "x:?q: bad option value timeout='0': expected a number of seconds above 0, such as 2.5"),
    ("timeout=nan", "x:?q: bad option value timeout='nan': expected a number of seconds above 0, such as 2.5"),
    ("header-pa=-1", "x:?q: bad option value header-pa='-1': expected a physical address such as 0x7fe000"),
    ("memory=disk", "x:?q: memory='disk' is none of shm, stream"),
    ("=1", "x:?q: unknown option ''; the options are keep, header-pa=ADDR, timeout=S, memory=shm|stream"),
])
def test_one_set_of_messages(query, message):
    with pytest.raises(SourceError) as raised:
        parse_options("x:?q", query, DECLARED)
    assert str(raised.value) == message


def test_no_options_at_all():
    with pytest.raises(SourceError, match=r"^x:\?a: unknown option 'a'; it takes no options$"):
        parse_options("x:?a", "a", ())


def test_value_types():
    assert (integer("0x1e"), integer("30"), address("0"), seconds("1e-3")) == (30, 30, 0, 0.001)
    for convert, text in ((integer, "4.5"), (address, "x"), (seconds, "inf"), (seconds, "-2")):
        with pytest.raises(ValueError):
            convert(text)


def test_usage_and_help_come_from_the_declaration():
    keep, header_pa, timeout, memory = DECLARED
    assert [option.usage for option in DECLARED] == ["keep", "header-pa=ADDR", "timeout=S", "memory=shm|stream"]
    assert (keep.is_flag, header_pa.is_flag, memory.is_flag) == (True, False, False)
    assert (timeout.described, header_pa.described) == ("how long (default 10)", "where")
    assert (header_pa.keyword, Option("x", "y", keyword="z").keyword) == ("header_pa", "z")


def test_the_live_sources_parse_through_their_declarations():
    assert gdbstub.parse_location("gdb://127.0.0.1:1234?packets&timeout=3") == {
        "host": "127.0.0.1", "port": 1234, "keep_stopped": False, "header_pa": None, "packets": True, "timeout": 3.0}
    assert qmp.parse_location("qmp:/x.sock?memory=procmem") == {"address": "/x.sock", "memory": "procmem", "timeout": 10.0}
    with pytest.raises(SourceError, match=r"^gdb://h:1\?packets-only: unknown option 'packets-only'; the options are "
                                          r"keep-stopped, header-pa=ADDR, packets, timeout=S$"):
        gdbstub.parse_location("gdb://h:1?packets-only")


# -- gdb's windump-save: the same names as the gdb:// location -----------------------------------

def test_windump_save_flags_are_the_gdb_url_options():
    parser = gdbfront.save_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for option in gdbstub.OPTIONS:
        assert (f"--{option.name}" in flags) == (option.name != "keep-stopped"), option.name
    assert {"-f", "--force", "-q", "--quiet", "-v", "--verbose"} <= flags
    parsed = parser.parse_args(["--packets", "--header-pa", "0x7fe000", "--timeout", "2", "-vv", "out.dmp"])
    assert (parsed.packets, parsed.header_pa, parsed.timeout, parsed.verbose, parsed.force) == (True, 0x7FE000, 2.0, 2, None)
    default = parser.parse_args(["out.dmp"])
    assert (default.packets, default.header_pa, default.timeout, getattr(default, "verbose", 0)) == (None, None, 10.0, 0)


def test_windump_save_refuses_as_a_location_does():
    with pytest.raises(WindumpError) as raised:
        gdbfront.save_parser().parse_args(["--timeout", "soon", "out.dmp"])
    message = str(raised.value)
    assert message.startswith("argument --timeout: bad option value timeout='soon': expected a number of seconds")
    assert "\n" not in message and message.endswith("[-q] [-v] FILE)")
    with pytest.raises(WindumpError, match=r"^unrecognized arguments: --packets-only \(usage: windump-save "):
        gdbfront.save_parser().parse_args(["--packets-only", "out.dmp"])


def test_settings_are_declared_once():
    """Each ``set windump NAME`` is a Settings field with the same default; the flag it stands in for
    has that name too."""
    assert [setting.keyword for setting in gdbfront.SETTINGS] == list(gdbfront.Settings.__dataclass_fields__)
    assert {s.keyword: s.default for s in gdbfront.SETTINGS} == vars(gdbfront.Settings())
    packets = next(option for option in gdbstub.OPTIONS if option.name == "packets")
    assert next(s for s in gdbfront.SETTINGS if s.name == "packets").doc == packets.help


def test_help_windump_save_is_the_parsers():
    text = gdbfront.save_help()
    first, usage = text.splitlines()[:2]
    assert first == gdbfront.SUMMARY and usage.startswith("usage: windump-save [-f] ")
    assert gdbfront.save_parser().format_help().rstrip() in text
    for option in gdbfront.SAVE_OPTIONS:
        assert " ".join(option.help.split()[:6]) in " ".join(text.split()), option.name
    for setting in gdbfront.SETTINGS:
        assert f"set windump {setting.name} on|off" in text
    script = (ROOT / "gdb" / "windump.py").read_text()
    assert "--packets" not in script and "Usage:" not in script  # no hand-written copy in the gdb script


# -- what the front ends print ------------------------------------------------------------------

def test_access_summary_says_path_reasons_and_pause():
    assert access_text(None) == ""
    assert access_text(Access("file")) == "from file"
    assert access_text(Access("stream", {"shm": "no backend", "procmem": "denied"}, 1.234)) == (
        "from stream (passed over shm: no backend; procmem: denied), guest paused 1.23 s")
    report = SaveReport("g.dmp", 3 << 20, 2, 766, 0.5, "x64", access=Access("procmem", paused_seconds=0.0))
    assert summary_line(report) == "wrote g.dmp: 3.00 MiB, 2 runs, 766 pages, 0.5 s, 6 MB/s, from procmem"  # found paused


def test_log_lines_show_the_asked_level_and_leave_logging_as_found():
    logger = logging.getLogger("windump_plugins")
    before = (logger.level, list(logger.handlers))
    lines: list[str] = []
    child = logging.getLogger("windump_plugins.live.test")
    with log_lines("pfx", lines.append, 1):
        child.debug("hidden")
        child.info("path %s", "procmem")
        child.warning("odd")
    child.info("after")
    assert lines == ["pfx: info: path procmem\n", "pfx: warning: odd\n"]
    assert (logger.level, logger.handlers) == before


def test_save_timer_splits_header_body_and_sync(caplog):
    ticks = iter([10.0, 10.5, 11.0, 13.0, 13.25])
    forwarded = []
    timer = SaveTimer(lambda done, total: forwarded.append((done, total)), clock=lambda: next(ticks))
    timer(0, 100)
    timer(50, 100)
    timer(100, 100)
    assert forwarded == [(0, 100), (50, 100), (100, 100)]
    assert timer.phases() == {"header": 0.5, "body": 2.5, "sync": 0.25}
    report = SaveReport("g.dmp", 250_000_000, 1, 1, 3.25, "x64", access=Access("shm", {}, 0.5))
    ticks = iter([13.25])
    with caplog.at_level(logging.INFO, "windump_plugins"):
        timer.log(report)
    assert caplog.messages == ["g.dmp: read from shm, guest paused 0.50 s",
                               "g.dmp: header 0.50 s, body 2.50 s (100 MB/s), sync 0.25 s"]


def test_option_argument_keeps_choices_and_flag_defaults():
    parser = argparse.ArgumentParser()
    for option in DECLARED:
        option_argument(option, default_note="default: set x").add_to(parser)
    assert vars(parser.parse_args([])) == {"keep": None, "header_pa": None, "timeout": 10.0, "memory": None}
    assert parser.parse_args(["--memory", "shm"]).memory == "shm"
    assert re.search(r"--memory shm\|stream", parser.format_help())
    assert parser.parse_args(["--timeout", "1"]).timeout == 1.0
