"""The README stays a short front page whose commands match CI, and its links point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_readme_is_short():
    assert len(README.splitlines()) <= 250, "the README is the front page: move details into docs/"


def test_readme_test_command_is_what_ci_runs():
    block = README.split("# 2. the test suite\n", 1)[1].splitlines()[0]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert block.startswith("pip install") and block in ci


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [link.split("#")[0] for link in links if not link.startswith(("http://", "https://", "#"))]
    assert local, "no local links found"
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
