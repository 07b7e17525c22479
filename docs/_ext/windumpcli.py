"""Sphinx directives that document the front ends from what they are built from, so the pages say
what ``--help`` says: the ``windump`` subcommands from the command table
(:data:`windump_plugins.frontends.cli.COMMANDS`) with their ``--json`` schemas, the built-in
sources' options from their declarations, and gdb's ``windump-save`` from its one parser."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList
from sphinx.util.nodes import nested_parse_with_titles


def _indented(text: str) -> list[str]:
    return [f"    {line}" if line else "" for line in text.splitlines()]


def _argument_lines(arguments) -> list[str]:
    lines = []
    for argument in arguments:
        name = argument.options.get("metavar", argument.flags[0]) if not argument.flags[0].startswith("-") else (
            ", ".join(argument.flags))
        lines += [f"``{name}``", f"    {argument.options.get('help', '')}", ""]
    return lines


def _compact_json(value, indent: str = "") -> str:
    """JSON with every part that fits on a line kept on one line, so a schema reads as a page."""
    flat = json.dumps(value)
    if len(indent) + len(flat) <= 96 or not isinstance(value, (dict, list)) or not value:
        return flat
    inner = indent + "  "
    if isinstance(value, dict):
        parts = [f"{inner}{json.dumps(key)}: {_compact_json(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(parts) + f"\n{indent}}}"
    return "[\n" + ",\n".join(f"{inner}{_compact_json(item, inner)}" for item in value) + f"\n{indent}]"


def _schema_type(schema: dict) -> str:
    if "enum" in schema:
        return " | ".join(json.dumps(choice) for choice in schema["enum"])
    if "anyOf" in schema:
        return " | ".join(_schema_type(choice) for choice in schema["anyOf"])
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]

    def name(kind: str) -> str:
        if kind == "array":
            return f"array of {_schema_type(schema['items'])}"
        return "0x string" if kind == "string" and schema.get("pattern", "").startswith("^0x") else kind

    return " | ".join(name(kind) for kind in kinds)


def _schema_rows(schema: dict, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(field, type, description)`` of every property, nested ones as ``a.b`` and ``a[].b``."""
    rows = []
    for name, prop in schema.get("properties", {}).items():
        field = prefix + name
        objects = [choice for choice in prop.get("anyOf", [prop]) if choice.get("type") == "object"]
        items = [choice["items"] for choice in prop.get("anyOf", [prop]) if choice.get("type") == "array"]
        description = prop.get("description") or next((o.get("description", "") for o in objects + items), "")
        rows.append((field, _schema_type(prop), description))
        for nested in objects:
            rows += _schema_rows(nested, f"{field}.")
        for nested in items:
            rows += _schema_rows(nested, f"{field}[].")
    return rows


def _json_lines(schema: dict) -> list[str]:
    lines = ["``--json`` prints one object with these fields, all of them always present:", "",
             ".. list-table::", "   :header-rows: 1", "", "   * - field", "     - type", "     - meaning"]
    for field, kind, description in _schema_rows(schema):
        lines += [f"   * - ``{field}``", f"     - {kind}", f"     - {description}"]
    return lines + ["", "Its JSON Schema (draft 2020-12), which the tests check the real output against:", "",
                    ".. code-block:: json", "", *_indented(_compact_json(schema)), ""]


def _usage_part(argument) -> str:
    metavar = argument.options.get("metavar")
    return f"[{argument.flags[-1]} {metavar}]" if metavar else f"[{argument.flags[-1]}]"


def _command_lines(entry) -> list[str]:
    positionals = [a for a in entry.arguments if not a.flags[0].startswith("-")]
    options = [a for a in entry.arguments if a.flags[0].startswith("-")]
    usage = " ".join(["windump", entry.name, *(_usage_part(a) for a in options),
                      *(a.options.get("metavar", a.flags[0]) for a in positionals)])
    title = f"windump {entry.name}"
    lines = [title, "~" * len(title), "", f"*{entry.summary}*", "", "::", "", f"    {usage}", "",
             entry.description, ""]
    lines += _argument_lines(positionals + options)
    if entry.examples:
        lines += ["Examples::", "", *(f"    {example}" for example in entry.examples), ""]
    if entry.json_schema is not None:
        lines += _json_lines(entry.json_schema)
    return lines


def _source_lines(kind) -> list[str]:
    lines = [f"``{kind.pattern}``", f"    {kind.summary}", ""]
    if kind.options:
        lines += ["    .. list-table::", "       :header-rows: 1", "", "       * - option", "         - default",
                  "         - what it does"]
        for option in kind.options:
            lines += [f"       * - ``?{option.usage}``", f"         - {option.default or ''}",
                      f"         - {option.help}"]
        lines.append("")
    return lines


def _parse(directive: Directive, lines: list[str], source: str) -> list[nodes.Node]:
    node = nodes.section()
    node.document = directive.state.document
    nested_parse_with_titles(directive.state, StringList(lines, source=source), node)
    return node.children


class WindumpCommands(Directive):
    """``.. windump-commands::``: the program's own options, then a section per subcommand with its
    usage, description, arguments, examples and ``--json`` schema."""

    def run(self):
        from windump_plugins.frontends.cli import COMMANDS, GLOBAL_ARGUMENTS

        lines = ["Before the command, ``windump`` takes:", ""] + _argument_lines(GLOBAL_ARGUMENTS)
        lines += [line for entry in COMMANDS for line in _command_lines(entry)]
        return _parse(self, lines, "windump_plugins.frontends.cli.COMMANDS")


class WindumpSources(Directive):
    """``.. windump-sources::``: each source the built-in plugins open, with its options as declared."""

    def run(self):
        from windump_plugins.plugins import load_plugins

        built_in = ",".join(ep.name for ep in entry_points(group="windump") if ep.value.startswith("windump_plugins."))
        plugins = load_plugins({"WINDUMP_PLUGINS": built_in})
        lines = [line for kind in plugins.kinds() for line in _source_lines(kind)]
        return _parse(self, lines, "windump_source_kinds")


class WindumpSaveHelp(Directive):
    """``.. windump-save-help::``: what ``help windump-save`` prints in gdb."""

    def run(self):
        from windump_plugins.frontends.gdb import save_help

        return [nodes.literal_block(text=save_help())]


def setup(app):
    app.add_directive("windump-commands", WindumpCommands)
    app.add_directive("windump-sources", WindumpSources)
    app.add_directive("windump-save-help", WindumpSaveHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
