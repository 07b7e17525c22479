"""Sphinx configuration for windump's documentation (``sphinx-build -W -b html docs docs/_build``)."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]

project = "windump"
author = "the windump authors"
copyright = "the windump authors"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode", "dtypelayout", "windumpcli"]

# The gdb front end imports gdb's embedded module, which exists only inside gdb.
autodoc_mock_imports = ["gdb"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"

exclude_patterns = ["_build"]
html_theme = "alabaster"
