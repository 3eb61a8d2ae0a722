"""The repository's own text files: nothing a merge left behind."""
from __future__ import annotations

import subprocess

from conftest import REPO

TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".json", ".ipynb", ".cfg"}


def test_no_merge_conflict_markers():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    marked = [f"{name}:{number}" for name in files if (REPO / name).suffix in TEXT_SUFFIXES and (REPO / name).is_file()
              for number, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1)
              if line.startswith(("<<<<<<< ", ">>>>>>> "))]
    assert len(files) > 50 and not marked, marked
