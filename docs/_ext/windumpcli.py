"""A Sphinx directive that documents the ``windump`` subcommands from the table the command line is
built from (:data:`windump_plugins.frontends.cli.COMMANDS`), so the page says what ``--help`` says."""

from __future__ import annotations

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList
from sphinx.util.nodes import nested_parse_with_titles


def _command_lines(entry) -> list[str]:
    positionals = [a for a in entry.arguments if not a.flags[0].startswith("-")]
    options = [a for a in entry.arguments if a.flags[0].startswith("-")]
    usage = " ".join(["windump", entry.name, *(f"[{a.flags[-1]}]" for a in options),
                      *(a.options.get("metavar", a.flags[0]) for a in positionals)])
    title = f"windump {entry.name}"
    lines = [title, "-" * len(title), "", f"*{entry.summary}*", "", "::", "", f"    {usage}", "",
             entry.description, ""]
    names = [a.options.get("metavar", a.flags[0]) for a in positionals] + [", ".join(a.flags) for a in options]
    for name, argument in zip(names, positionals + options):
        lines += [f"``{name}``", f"    {argument.options.get('help', '')}", ""]
    if entry.examples:
        lines += ["Examples::", "", *(f"    {example}" for example in entry.examples), ""]
    return lines


class WindumpCommands(Directive):
    """``.. windump-commands::``: a section per subcommand with its usage, description, arguments
    and examples."""

    def run(self):
        from windump_plugins.frontends.cli import COMMANDS

        lines = [line for entry in COMMANDS for line in _command_lines(entry)]
        container = StringList(lines, source="windump_plugins.frontends.cli.COMMANDS")
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, container, node)
        return node.children


def setup(app):
    app.add_directive("windump-commands", WindumpCommands)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
