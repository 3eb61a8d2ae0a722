"""Atomic file writes: a temporary file next to the target, then os.replace, so readers never see half a file."""
from __future__ import annotations

import os
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A hidden name next to `path`, unique per process, keeping the suffix (matplotlib picks the format from it)."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def write_atomic(path: Path, text: str) -> None:
    tmp = temporary_sibling(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_figure(figure, path: Path, dpi: int = 120) -> None:
    """A matplotlib figure saved atomically (format from the suffix)."""
    tmp = temporary_sibling(path)
    figure.savefig(tmp, dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)
