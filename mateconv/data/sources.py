"""What a user's data directory holds: each file's kind (pretrain, sft, dpo, tasks), format and record count.

    from mateconv.data.sources import scan
    for found in scan("my_corpus"): print(found.line())

A file's kind is decided by its content: the most common kind among its first `SAMPLE` readable records (a .txt
file is pretraining text), read from its head alone (at most `HEAD` records; past them while every line so far is
broken: not JSON, not UTF-8), so that a corpus of gigabytes is classified in moments. Stage 2 reads every record once:
it counts them, and skips and reports with file:line the records of another kind and the lines that are not JSON. A
name that says otherwise (`dpo*.jsonl` holding SFT conversations) is noted.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mateconv.data import DataError
from mateconv.data.dataset_info import FILE_NAME as DATASET_INFO, SOURCE_KEYS, dataset_info, entry_for
from mateconv.data.formats import ROLE_NAMES, detect_format
from mateconv.data.readers import MODEL_FILES, SUFFIXES, TEXT_KEYS, BadLine, files_under, iter_records, record_text

SAMPLE = 50
HEAD = 1000  # records read, bad ones included, to find SAMPLE readable ones; past it only while all are broken lines
PLACEHOLDER = re.compile(r"\{\{\w+\}\}")  # LLaMA-Factory's identity.json: "I am {{name}}, ... by {{author}}"
KINDS = ("pretrain", "sft", "dpo", "tasks")
SHAPES = {  # formats.detect_format's shape -> (kind, the name users know it by)
    "messages": ("sft", "OpenAI messages"),
    "sharegpt": ("sft", "ShareGPT conversations"),
    "alpaca": ("sft", "Alpaca"),
    "prompt_completion": ("sft", "TRL prompt/completion"),
    "prompt_pref": ("dpo", "TRL prompt/chosen/rejected"),
    "sharegpt_pref": ("dpo", "LLaMA-Factory dpo"),
    "alpaca_pref": ("dpo", "Alpaca preference (LLaMA-Factory ranking)"),
    "hh": ("dpo", "hh-rlhf transcripts"),
    "implicit_pref": ("dpo", "MiniMind/TRL chosen/rejected messages"),
}


def record_kind(record: Any) -> tuple[str, str]:
    """(kind, format name) of one record; DataError when it fits no kind."""
    if isinstance(record, dict) and isinstance(record.get("messages"), list) and "answer" in record:
        return "tasks", "verifiable tasks"
    if isinstance(record, dict) and record and all(isinstance(v, dict) and not v.keys().isdisjoint(SOURCE_KEYS)
                                                   for v in record.values()):
        raise DataError("LLaMA-Factory's list of data sets, not data: the data files beside it are read, each by its "
                        "content")
    try:
        kind, name = SHAPES[detect_format(record)]
    except DataError:
        key = next((k for k in TEXT_KEYS if isinstance(record, dict) and isinstance(record.get(k), (str, list))), None)
        if key is None:
            if isinstance(record, dict) and any(k in record for k in TEXT_KEYS):
                record_text(record)  # raises, naming the text field that is null or not text
            raise
        return "pretrain", f"'{key}' field"
    turns = record.get("conversations")
    if kind == "sft" and ends_unanswered(record.get("messages", turns)):
        raise DataError("the last assistant turn is empty: a prompt for RL rollouts (as MiniMind's rlaif.jsonl), "
                        "not an SFT conversation")
    if name.startswith("ShareGPT") and turns and isinstance(turns[0], dict) and "role" in turns[0]:
        name = "MiniMind conversations"  # {role, content} turns under "conversations"
    return kind, name


def ends_unanswered(turns: Any) -> bool:
    """Whether a conversation's last turn is an assistant turn left empty, with no tool call, for a model to write."""
    last = turns[-1] if isinstance(turns, list) and turns and isinstance(turns[-1], dict) else {}
    role = str(last.get("role", last.get("from"))).lower()
    return ROLE_NAMES.get(role) == "assistant" and not last.get("content", last.get("value")) and not (
        last.get("tool_calls") or last.get("function_call"))


def has_system(record: dict) -> bool:
    turns = record.get("messages") or record.get("conversations") or []
    return bool(record.get("system")) or any(isinstance(t, dict) and "system" in (t.get("role"), t.get("from"))
                                             for t in turns if isinstance(turns, list))


@dataclass
class DataFile:
    path: Path
    kind: str | None  # None: not used (the reason is in `format`)
    format: str
    size: int = 0  # bytes
    note: str = ""

    def line(self) -> str:
        if self.kind is None:
            return f"{self.path} → skipped: {self.format}"
        note = f"; {self.note}" if self.note else ""
        return f"{self.path} → {self.kind}, {self.format}, {readable_size(self.size)}{note}"


def readable_size(size: int) -> str:
    """'512 bytes', '3.4 KB', '1.2 GB' (powers of 1000, as `ls -lh --si` and file managers show them)."""
    if size < 1000:
        return f"{size} bytes"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            return f"{size:,.1f} {unit}"


def _suffix_ok(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def recognize(path: Path) -> DataFile:
    """The kind and format of one file, from its head (`HEAD`, `SAMPLE`); a file whose head is all broken lines is read
    on to its first readable record, so that a broken head does not lose the records after it."""
    names: Counter = Counter()
    system = False
    broken = 0
    placeholders: set[str] = set()
    first_error = first_bad = ""
    try:
        for read, (_, number, record) in enumerate(iter_records(path), 1):
            if read > HEAD and (names or first_error):  # records of no known shape: the rest is likely alike
                break
            if isinstance(record, BadLine):
                broken += 1
                first_bad = first_bad or f"{path}:{number}: {record.error}"
                continue
            try:
                names[record_kind(record)] += 1
                system = system or has_system(record)
                placeholders.update(PLACEHOLDER.findall(record_text(record)))
            except DataError as error:
                first_error = first_error or f"{path}:{number}: {error}"
            if names.total() == SAMPLE:
                break
    except DataError as error:  # a .json file that does not parse at all
        return DataFile(path, None, str(error))
    if not names:
        reason = first_error or (f"{broken} bad lines, the first {first_bad}" if broken else "no records")
        return DataFile(path, None, f"not recognised ({reason})")
    kinds = Counter()
    for (kind, _), count in names.items():
        kinds[kind] += count
    kind = kinds.most_common(1)[0][0]
    name = max((n for k, n in names if k == kind), key=lambda n: names[kind, n])
    suffix = path.name.lower().removesuffix(".gz").rsplit(".", 1)[-1]
    if kind == "pretrain":
        name = "plain text" if suffix == "txt" else f"{suffix} {name}"
    if kind in ("sft", "dpo") and system:
        name += ", with system turns"
    entry = entry_for(path)
    if entry:
        name += f" (as {DATASET_INFO} entry {entry.name!r} describes it)"
    named = next((k for k in KINDS if path.name.lower().startswith(k)), None)
    notes = [f"named like {named} data but holds {kind} records"] if named and named != kind else []
    if placeholders:
        notes.append(f"holds template placeholders ({', '.join(sorted(placeholders))}), which would train as they "
                     "are: fill them in first")
    note = "; ".join(notes)
    return DataFile(path, kind, name, path.stat().st_size, note)



def scan(data_dir: str | Path, outputs: tuple[Path, ...] = ()) -> list[DataFile]:
    """Every file under data_dir (recursively, sorted); hidden files are ignored, other types reported as skipped.
    `outputs` are the run's own directories (out/, logs/), left out with one line each where data_dir holds them.
    A data_dir that is one file is taken as a directory holding only it."""
    root = Path(data_dir)
    if root.is_file():
        try:
            root.open("rb").close()
        except OSError as error:
            raise DataError(f"{root}: cannot read the file: {error.strerror}") from None
        files, inside = [root], []
    elif root.is_dir():
        inside = [folder for folder in outputs if folder.is_dir() and folder.is_relative_to(root)]
        files = [p for p in files_under(root) if not any(part.startswith(".") for part in p.relative_to(root).parts)
                 and not any(p.is_relative_to(folder) for folder in inside)]
        if not files:
            raise DataError(f"{root}: the directory is empty")
    else:
        raise DataError(f"{root}: {'not a file or directory' if root.exists() else 'no such file or directory'}")
    return [DataFile(folder, None, "this run's own outputs") for folder in inside] + [
        found for p in files for found in (
            described(p) if p.name == DATASET_INFO else [skipped(p) or recognize(p)])]


def skipped(path: Path) -> DataFile | None:
    """Why a file is no data, before its content is read; None for a file to read."""
    if path.name in MODEL_FILES:
        return DataFile(path, None, "a model's or tokenizer's file, not data (a tokenizer directory is used with "
                                    "--tokenizer DIR)")
    if not _suffix_ok(path):
        return DataFile(path, None, f"not a {'/'.join(s for s in SUFFIXES if not s.endswith('.gz'))} file")
    return None


def described(path: Path) -> list[DataFile]:
    """LLaMA-Factory's dataset_info.json: one line for what it is, one for each kind of entry not read."""
    info = dataset_info(path.parent)
    what = DataFile(path, None, f"LLaMA-Factory's list of data sets, not data: its entries say how to read the "
                                f"{len(info.entries)} files or folders here that they name")
    return [what] + [DataFile(path, None, note) for note in info.notes]


def by_kind(files: list[DataFile]) -> dict[str, list[DataFile]]:
    """The recognised files grouped by kind, in KINDS order."""
    return {kind: [f for f in files if f.kind == kind] for kind in KINDS if any(f.kind == kind for f in files)}
