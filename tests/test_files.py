"""Atomic directories: a finished one replaces the target whole, a failed one leaves the target as it was."""
from __future__ import annotations

import pytest

from mateconv.files import atomic_dir


def test_atomic_dir_replaces_the_old_directory(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp != target and not any(tmp.iterdir())
        (tmp / "model.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["model.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_atomic_dir_creates_missing_parents(tmp_path):
    with atomic_dir(tmp_path / "a" / "b") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "x").read_text() == "x"


def test_failure_leaves_the_old_directory_intact(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "model.bin").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "model.bin").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "model.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_leftovers_of_a_killed_run_are_cleared(tmp_path):
    target = tmp_path / "final"
    with atomic_dir(target) as tmp:
        pass
    tmp.mkdir()
    (tmp / "partial").write_text("from a killed process with the same pid")
    with atomic_dir(target) as again:
        assert again == tmp and not any(again.iterdir())
