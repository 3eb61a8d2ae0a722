"""The repository's own text files: nothing a merge left behind, no link in the docs that leads nowhere."""
from __future__ import annotations

import re
import subprocess

from conftest import REPO

TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".json", ".ipynb", ".cfg"}


def test_no_merge_conflict_markers():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    marked = [f"{name}:{number}" for name in files if (REPO / name).suffix in TEXT_SUFFIXES and (REPO / name).is_file()
              for number, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1)
              if line.startswith(("<<<<<<< ", ">>>>>>> "))]
    assert len(files) > 50 and not marked, marked


def _markdown_outside_code(path):
    """The file's lines outside ``` fences."""
    inside = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif not inside:
            yield line


def _anchors(path):
    """The heading anchors GitHub makes for a Markdown file: lower case, punctuation dropped, spaces to '-'."""
    anchors = set()
    for line in _markdown_outside_code(path):
        heading = re.match(r"#+\s+(.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            repeat = 0
            while (anchor := f"{slug}-{repeat}" if repeat else slug) in anchors:  # GitHub numbers a repeated one
                repeat += 1
            anchors.add(anchor)
    return anchors


def test_docs_relative_links_resolve():
    pages = [REPO / "README.md", REPO / "README_zh.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for line in _markdown_outside_code(page):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                linked = (page.parent / file) if file else page
                if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
                    broken.append(f"{page.relative_to(REPO)}: {target}")
    assert len(pages) > 10 and not broken, broken
