"""The house rules of the package layout, read from the code itself: formats import nothing of
windump but its errors, transports and formats import no source, no source imports another, and no
class grows much over 300 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "windump_plugins"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every windump module that the code ``source`` of module ``name`` imports, at any depth of
    its code (imports inside functions included)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "windump_plugins":
                continue
            found.add(target)
            # ``from windump_plugins.formats import kdbg`` imports the module formats.kdbg
            for alias in node.names:
                if (PACKAGE.parent / (target + "." + alias.name).replace(".", "/")).with_suffix(".py").is_file():
                    found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "windump_plugins")
    return found


MODULES = {module_name(path): imported_modules(path.read_text(), module_name(path), path.name == "__init__.py")
           for path in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    """The room a module stands in: ``formats``, ``live``, ``sources`` ..., or ``core`` for the flat
    top level."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else "core"


def test_the_layout_has_its_rooms():
    rooms = {room(module) for module in MODULES}
    assert {"formats", "live", "sources", "headers", "frontends", "guest", "core"} <= rooms


@pytest.mark.parametrize("module", sorted(m for m in MODULES if room(m) == "formats"))
def test_formats_import_nothing_of_windump_but_errors(module):
    allowed = {"windump_plugins.errors", "windump_plugins.formats"}
    outside = {target for target in MODULES[module] if target not in allowed and room(target) != "formats"}
    assert not outside, f"{module} imports {sorted(outside)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if room(m) in ("formats", "live")))
def test_formats_and_transports_import_no_source(module):
    sources = {target for target in MODULES[module] if room(target) == "sources"}
    assert not sources, f"{module} imports {sorted(sources)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if room(m) == "sources"))
def test_no_source_imports_another(module):
    others = {target for target in MODULES[module]
              if room(target) == "sources" and target not in (module, "windump_plugins.sources")}
    assert not others, f"{module} imports {sorted(others)}"


#: Lines a class may have: "no class much over 300 lines" (a class holding a protocol, a cache and
#: three strategies is three classes).
MAX_CLASS_LINES = 320


def class_sizes(source: str) -> dict[str, int]:
    """Each class in ``source`` and its length in lines, decorators and docstring included."""
    return {node.name: node.end_lineno - min([node.lineno, *(d.lineno for d in node.decorator_list)]) + 1
            for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef) and node.end_lineno}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: module_name(path))
def test_no_class_is_much_over_300_lines(path):
    large = {name: lines for name, lines in class_sizes(path.read_text()).items() if lines > MAX_CLASS_LINES}
    assert not large, f"{module_name(path)}: {large}"


def test_class_sizes_count_every_line():
    assert class_sizes("@dataclass\nclass A:\n    x: int\n\n    def f(self):\n        pass\n") == {"A": 6}


def test_the_rules_see_imports_of_every_form():
    """Relative, absolute, module-valued and function-level imports are all read, so the rules above
    can fail."""
    code = ("from ..sources.elf import windump_open_file\n"
            "from windump_plugins.live import rsp\n"
            "def f():\n    import windump_plugins.save\n")
    found = imported_modules(code, "windump_plugins.formats.probe")
    assert {"windump_plugins.sources.elf", "windump_plugins.live.rsp", "windump_plugins.save"} <= found
    assert room("windump_plugins.live.rsp") == "live" and room("windump_plugins.save") == "core"
