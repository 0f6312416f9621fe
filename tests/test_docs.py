"""The documentation: a short README that links into docs/, and docs/ built as a MkDocs site whose strict
build fails on a broken link, a missing page or a page left out of the nav."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

README_MAX_LINES = 250


def _nav_pages(nav) -> list[str]:
    """The .md paths named anywhere in mkdocs.yml's nav (entries are strings, {title: page} or
    {title: [entries]})."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return [page for entry in nav for page in _nav_pages(entry)]


@pytest.fixture(scope="module")
def nav() -> list[str]:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with mkdocs, which is not installed")
    return _nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])


def test_the_site_builds_strictly_with_every_nav_page(tmp_path, nav):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the `test` extra installs mkdocs-material)")
    site = tmp_path / "site"
    # Not -q: it silences warnings before --strict counts them, and the build then passes whatever they say.
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(site)],
        capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rendered = [site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html") for page in nav]
    assert [p.relative_to(site).as_posix() for p in rendered if not p.is_file()] == []
    assert (site / "benchmarks" / "index.html").is_file()
    assert "<table" in (site / "benchmarks" / "index.html").read_text()


def test_every_docs_page_is_in_the_nav(nav):
    pages = sorted(p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md"))
    assert sorted(nav) == pages


def test_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = {t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t)}
    assert "docs/benchmarks.md" in local
    assert sorted(t for t in local if not (REPO / t).exists()) == []
