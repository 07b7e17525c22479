"""Every error message windump raises has an entry on docs/troubleshooting.rst.

How messages are found: every call in windump_plugins/ of a WindumpError class (``WindumpError``,
``SourceError``, ``FormatError``, ``TranslationError``, ``PluginError`` and any other subclass
defined there), and every ``raise`` of a helper such as ``self._fail(...)`` that builds one, whose
first argument is written out as a string or f-string (or names a module constant holding one).
Messages passed in a variable are not seen; the page covers them by hand.

How a message is matched: its *key* is the longest stretch of literal text between its
``{placeholders}``, stripped of spaces and punctuation at both ends (most messages start with the
path or location they are about, so the stable text comes after it). The page passes when it
contains every key verbatim, whitespace runs counted as one space. A message with no literal stretch
of at least 8 characters (``f"{path}: {exc.strerror}"``: an operating-system error passed on) has no
key; the page's general entry covers those.
"""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "windump_plugins"
PAGE = ROOT / "docs" / "troubleshooting.rst"

#: Shorter literal stretches say too little to find a message by (": ", " at ", "-").
MIN_KEY = 8


def _error_classes(trees: list[ast.Module]) -> set[str]:
    """WindumpError and every class in the package that derives from it, by name."""
    classes = {"WindumpError"}
    while True:
        found = {node.name for tree in trees for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                 and any(isinstance(base, ast.Name) and base.id in classes for base in node.bases)}
        if found <= classes:
            return classes
        classes |= found


def _name(call: ast.Call) -> str:
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")


def _literal_stretches(message: ast.expr, constants: dict[str, str]) -> list[str] | None:
    """The literal text between a message's placeholders, or None when it is not written out."""
    if isinstance(message, ast.Name):
        message = constants.get(message.id)
        return None if message is None else [message]
    if isinstance(message, ast.Constant) and isinstance(message.value, str):
        return [message.value]
    if isinstance(message, ast.JoinedStr):
        return [part.value for part in message.values if isinstance(part, ast.Constant)]
    return None


def error_messages() -> dict[str, str]:
    """``key -> "file:line"`` of the first message with that key, for every written-out message."""
    trees = {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}
    classes = _error_classes(list(trees.values()))
    messages: dict[str, str] = {}
    for path, tree in trees.items():
        constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                     for target in node.targets if isinstance(target, ast.Name)}
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and _name(node) in classes]
        calls += [node.exc for node in ast.walk(tree) if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                  and _name(node.exc) not in classes and not hasattr(builtins, _name(node.exc))]
        for call in calls:
            stretches = _literal_stretches(call.args[0], constants) if call.args else None
            if stretches is None:
                continue
            key = max((stretch.strip(" :;,.-()'\"") for stretch in stretches), key=len, default="")
            if len(key) >= MIN_KEY:
                messages.setdefault(" ".join(key.split()), f"{path.relative_to(ROOT)}:{call.lineno}")
    return messages


def test_the_collector_sees_the_messages_it_should():
    messages = error_messages()
    # A plain f-string, a module constant, and a message built by a helper (ELF's self._fail).
    assert "No such file or directory" in messages
    assert any(key.startswith("the guest published no VMCOREINFO note") for key in messages)
    assert "not an ELF file (no \\x7fELF magic" in messages


def test_every_error_message_has_a_troubleshooting_entry():
    page = " ".join(PAGE.read_text().split())
    missing = [f"{where}: {key!r}" for key, where in sorted(error_messages().items(), key=lambda item: item[1])
               if key not in page]
    assert not missing, "docs/troubleshooting.rst has no entry for:\n" + "\n".join(missing)


def test_every_entry_gives_a_cause_and_a_fix():
    entries = re.findall(r"^``(.+)``\n((?:   .*\n|\n)+)", PAGE.read_text(), re.M)
    assert len(entries) >= 40
    for message, text in entries:
        assert "Cause:" in text and "Fix:" in text, f"entry {message!r} lacks a Cause: or a Fix:"
