"""mateconv.files: atomic directories (all or nothing) and the rows of a metrics.jsonl."""
from __future__ import annotations

import pytest

from mateconv.files import atomic_dir, read_metrics


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


def test_read_metrics_skips_blank_lines_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]


def test_read_metrics_names_a_bad_line_before_the_end(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2,\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(path)
