"""Atomic writes: files and directories are written under a temporary name next to the target, then renamed into
place, so readers never see half of one."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished directory into place, replacing an older one (the old one is removed only afterwards)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """`with atomic_dir(target) as tmp:` write into the empty directory `tmp`; on success it replaces `target`, on
    an exception it is deleted and `target` stays as it was."""
    target = Path(target)
    tmp = temporary_sibling(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)
