"""Files the stages share. Atomic writes: files and directories are written under a temporary name next to the
target, then renamed into place, so readers never see half of one. The reader of a run's metrics.jsonl."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import yaml

from mateconv.errors import InputError


def temporary_sibling(path: Path) -> Path:
    """A hidden name next to `path`, unique per process, keeping the suffix (matplotlib picks the format from it)."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def write_atomic(path: Path, text: str) -> None:
    tmp = temporary_sibling(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class OutputDirError(InputError, ValueError):
    """An output directory that cannot be made or written in (its message is the one line to show)."""


def tail_text(path: Path, size: int = 4096) -> str:
    """The last `size` bytes of a file as text (a log's last lines; a character cut at the start is replaced)."""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        return handle.read().decode("utf-8", "replace")


def dirs_to_make(path: Path) -> list[Path]:
    """The directories that making `path` with its parents creates, the deepest first."""
    return [directory for directory in (path, *path.parents) if not directory.exists()]


def remove_empty_dirs(directories: list[Path]) -> None:
    """Removes each of `directories` that is empty, in order (dirs_to_make's: a parent after its child)."""
    for directory in directories:
        with suppress(OSError):
            directory.rmdir()


def writable_dir(path: str | Path, flag: str) -> Path:
    """Makes the directory `path` (with its parents) and checks that a file can be written in it, so that a file of
    that name, a missing or read-only mount is one line before any work, not a traceback after it. `flag` names the
    setting in the message (out_dir, --output_dir)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"{flag}: cannot create the directory {path} ({e.strerror}: {e.filename})") from None
    probe = temporary_sibling(path / "write-check")
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"{flag}: cannot write in the directory {path} ({e.strerror})") from None
    return path


class LockHeld(RuntimeError):
    """Another live process holds the lock; `pid` is the one it wrote into the lock file."""

    def __init__(self, pid: str):
        super().__init__(f"held by pid {pid}")
        self.pid = pid


def locked(path: Path) -> IO[str]:
    """File `path` (created) opened and locked exclusively, with this process's pid in it; closing it releases the
    lock, and so does the end of the process, however it ends. LockHeld if another process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise LockHeld(holder) from None
    except OSError:  # a file system without locks (some Lustre or NFS mounts): unlocked rather than no run at all
        pass
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader refusing a key given twice in one mapping (YAML forbids it; PyYAML keeps the last, so
    the first was silently not used). A merge (`<<: *base`) may still be overridden."""

    def construct_mapping(self, node, deep=False):
        first_lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_lines.get(key)
            except TypeError:  # an unhashable key: SafeLoader names it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} is given twice (first at line {first})", problem_mark=key_node.start_mark)
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml_mapping(text: str):
    """`yaml.safe_load(text)` refusing duplicate keys (UniqueKeyLoader); its YAMLError goes to `yaml_error`."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def yaml_error(path: Path, error: Exception) -> str:
    """`path:line: not valid YAML: <the problem>` for a PyYAML parse error (its message's first line, such as 'while
    scanning for the next token', names neither the line nor what is wrong there)."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    return f"{where}: not valid YAML: {problem or str(error).splitlines()[0]}"


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


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, one JSON object per line as the training tracker writes them. Blank lines are
    skipped, and so is a last line that is not valid JSON (a writer killed mid-row, or one still writing while the
    file is read); any other bad line raises ValueError naming it."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        rows.append(row)
    return rows
