"""The Sphinx documentation builds without a single warning (``sphinx-build -W``) and says what the
README and the difference table say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from difftable import load_differences
from gate import require

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_docs_build_without_warnings(tmp_path):
    require("sphinx")
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr + build.stdout
    # The difference table page shows every row of docs/differences.csv.
    page = (tmp_path / "html" / "differences.html").read_text()
    for row in load_differences():
        assert f"<p>{row.region}</p>" in page


def test_quickstart_has_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- quickstart:(\w+) -->\s*```sh\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no quickstart blocks"
    quickstart = (DOCS / "quickstart.rst").read_text()
    for name, commands in blocks:
        for command in commands.strip().splitlines():
            assert f"    {command}\n" in quickstart, f"docs/quickstart.rst lacks README's quickstart:{name} {command!r}"
