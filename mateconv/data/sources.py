"""What a user's data directory holds: each file's kind (pretrain, sft, dpo, tasks), format and record count.

    from mateconv.data.sources import scan
    for found in scan("my_corpus"): print(found.line())

A file's kind is decided by its content: the most common kind among its first `SAMPLE` readable records (a .txt
file is pretraining text). Records of another kind, and lines that are not JSON, are left to stage 2, which skips and
reports them with file:line. A name that says otherwise (`dpo*.jsonl` holding SFT conversations) is noted.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mateconv.data import DataError
from mateconv.data.formats import detect_format
from mateconv.data.readers import SUFFIXES, TEXT_KEYS, BadLine, files_under, iter_records, record_text

SAMPLE = 50
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
    if name.startswith("ShareGPT") and turns and isinstance(turns[0], dict) and "role" in turns[0]:
        name = "MiniMind conversations"  # {role, content} turns under "conversations"
    return kind, name


def has_system(record: dict) -> bool:
    turns = record.get("messages") or record.get("conversations") or []
    return bool(record.get("system")) or any(isinstance(t, dict) and "system" in (t.get("role"), t.get("from"))
                                             for t in turns if isinstance(turns, list))


@dataclass
class DataFile:
    path: Path
    kind: str | None  # None: not used (the reason is in `format`)
    format: str
    records: int = 0
    broken: int = 0  # lines that are not valid JSON or not UTF-8
    note: str = ""

    def line(self) -> str:
        if self.kind is None:
            return f"{self.path} → skipped: {self.format}"
        broken = f" ({self.broken} bad line{'s' if self.broken > 1 else ''})" if self.broken else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.path} → {self.kind}, {self.format}, {self.records:,} records{broken}{note}"


def _suffix_ok(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def recognize(path: Path) -> DataFile:
    """The kind and format of one file, and its record count (one pass over the file)."""
    names: Counter = Counter()
    system = False
    records = broken = 0
    first_error = first_bad = ""
    try:
        for _, number, record in iter_records(path):
            records += 1
            if isinstance(record, BadLine):
                broken += 1
                first_bad = first_bad or f"{path}:{number}: {record.error}"
                continue
            if names.total() < SAMPLE:
                try:
                    names[record_kind(record)] += 1
                    system = system or has_system(record)
                except DataError as error:
                    first_error = first_error or f"{path}:{number}: {error}"
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
    named = next((k for k in KINDS if path.name.lower().startswith(k)), None)
    note = f"named like {named} data but holds {kind} records" if named and named != kind else ""
    return DataFile(path, kind, name, records - broken, broken, note)


def scan(data_dir: str | Path, outputs: tuple[Path, ...] = ()) -> list[DataFile]:
    """Every file under data_dir (recursively, sorted); hidden files are ignored, other types reported as skipped.
    `outputs` are the run's own directories (out/, logs/), left out with one line each where data_dir holds them."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    inside = [folder for folder in outputs if folder.is_dir() and folder.is_relative_to(root)]
    files = [p for p in files_under(root) if not any(part.startswith(".") for part in p.relative_to(root).parts)
             and not any(p.is_relative_to(folder) for folder in inside)]
    if not files:
        raise DataError(f"{root}: the directory is empty")
    return [DataFile(folder, None, "this run's own outputs") for folder in inside] + [
        recognize(p) if _suffix_ok(p) else
        DataFile(p, None, f"not a {'/'.join(s for s in SUFFIXES if not s.endswith('.gz'))} file") for p in files]


def by_kind(files: list[DataFile]) -> dict[str, list[DataFile]]:
    """The recognised files grouped by kind, in KINDS order."""
    return {kind: [f for f in files if f.kind == kind] for kind in KINDS if any(f.kind == kind for f in files)}
