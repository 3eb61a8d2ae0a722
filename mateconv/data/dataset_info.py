"""LLaMA-Factory's `dataset_info.json`: how to read the local files its entries name (data/README.md there).

An entry names its file (`file_name`, a file or a folder, relative to the directory of dataset_info.json), its
`formatting` (alpaca, the default, or sharegpt), whether it holds preference pairs (`ranking`), its column names
(`columns`) and, for sharegpt, its message keys and role names (`tags`). `Entry.record` renames a record's columns
and roles to the defaults, which mateconv.data.formats reads; an alpaca entry whose only column is the prompt
(`{"prompt": "text"}`) is pretraining text, as LLaMA-Factory's pretraining stage reads it. Entries on a hub or made
by a script are not read, nor are `num_samples` and `split` honoured: `DatasetInfo.notes` says which.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mateconv.data import DataError, json_type

FILE_NAME = "dataset_info.json"
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")  # win over file_name
SOURCE_KEYS = ("file_name", *REMOTE_KEYS)  # an entry names where its data set is with one of these
FORMATTINGS = ("alpaca", "sharegpt")
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}  # LLaMA-Factory's defaults
SHAREGPT_COLUMNS = {"messages": "conversations"}
KEPT_COLUMNS = ("system", "history", "tools", "chosen", "rejected", "kto_tag", "images", "videos", "audios")
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
ROLE_TAGS = ("user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
SHOWN = 5  # names listed in a note before "and N more"


@dataclass(frozen=True)
class Entry:
    name: str
    formatting: str
    ranking: bool
    columns: tuple[tuple[str, str], ...]  # (LLaMA-Factory's column, the file's name for it), the defaults filled in
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def pretraining(self) -> bool:
        return self.formatting == "alpaca" and not self.ranking and dict(self.columns).keys() == {"prompt"}

    @property
    def kind(self) -> str:
        return "dpo" if self.ranking else "pretrain" if self.pretraining else "sft"

    def record(self, record: Any) -> Any:
        """The record with LLaMA-Factory's default column names (and sharegpt's default message keys and roles)."""
        if not isinstance(record, dict):
            return record  # formats names what it is
        columns = dict(self.columns)
        if self.pretraining:
            return {"text": record.get(columns["prompt"])}
        names = ALPACA_COLUMNS if self.formatting == "alpaca" else SHAREGPT_COLUMNS
        out = {key: record[key] for key in ("id", "split") if key in record}  # stage 2 keeps a record's own
        out.update({names.get(key, key): record[column] for key, column in columns.items() if column in record})
        if self.formatting == "sharegpt":
            for key in ("conversations", "chosen", "rejected"):
                if key in out:
                    out[key] = self._turns(out[key])
        return out

    def _turns(self, turns: Any) -> Any:
        """Messages (a list, or the one message of a chosen/rejected column) with from/value keys and default roles."""
        if isinstance(turns, list):
            return [self._turns(turn) for turn in turns]
        if not isinstance(turns, dict):
            return turns
        tags = dict(self.tags)
        roles = {tags[tag]: DEFAULT_TAGS[tag] for tag in ROLE_TAGS}
        role, content = turns.get(tags["role_tag"]), turns.get(tags["content_tag"])
        rest = {key: value for key, value in turns.items() if key not in (tags["role_tag"], tags["content_tag"])}
        return {**rest, "from": roles.get(role, role) if isinstance(role, str) else role, "value": content}


@dataclass
class DatasetInfo:
    path: Path
    entries: dict[Path, Entry] = field(default_factory=dict)  # the file or folder each readable entry names
    notes: list[str] = field(default_factory=list)  # the entries not read, one line per reason

    def entry_for(self, data_file: Path) -> Entry | None:
        """The entry naming this file, or the folder holding it."""
        data_file = Path(os.path.abspath(data_file))
        return next((entry for named, entry in self.entries.items()
                     if data_file == named or data_file.is_relative_to(named)), None)


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _entry(name: str, spec: dict) -> Entry:
    """The entry, or a DataError saying why it cannot be read."""
    formatting = spec.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"formatting {formatting!r} is not {' or '.join(FORMATTINGS)}")
    columns, tags = spec.get("columns") or {}, spec.get("tags") or {}
    for what, value in (("columns", columns), ("tags", tags)):
        if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            raise DataError(f"{what} must be an object of names, got {json.dumps(value)}")
    defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    # LLaMA-Factory ignores the columns and tags an entry lists that its formatting has no use for
    tags = {key: value for key, value in tags.items() if key in DEFAULT_TAGS}
    if columns:  # LLaMA-Factory reads only the columns an entry lists, once it lists any
        columns = {key: value for key, value in columns.items() if key in {*defaults, *KEPT_COLUMNS}}
    else:
        columns = {**defaults, **{k: k for k in KEPT_COLUMNS}}
    if formatting == "sharegpt":
        columns = {**SHAREGPT_COLUMNS, **columns}
    return Entry(name, formatting, bool(spec.get("ranking", False)), tuple(columns.items()),
                 tuple({**DEFAULT_TAGS, **tags}.items()))


def _not_honoured(spec: dict, file_name: str) -> list[str]:
    """What the entry asks that is not done: a sample of the records (stage 2 drops the repeats LLaMA-Factory draws
    for more than the file holds) and a split other than the train split, the only one a local file has."""
    notes = []
    if spec.get("num_samples") is not None:
        notes.append(f"num_samples {json.dumps(spec['num_samples'])} is not honoured: every record of {file_name} is "
                     "read once")
    if spec.get("split", "train") != "train":
        notes.append(f"split {spec['split']!r} is not honoured: a local file has only its train split, which "
                     "is read")
    return notes


@lru_cache(maxsize=32)
def _read(path: Path, stamp: tuple[int, int]) -> DatasetInfo:
    try:
        specs = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: malformed JSON: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: {error.reason}: not UTF-8 text") from None
    if not isinstance(specs, dict):
        raise DataError(f"{path}: expected an object of data sets (LLaMA-Factory's dataset_info.json), got "
                        f"{json_type(specs)}")
    info = DatasetInfo(path)
    remote, absent = [], []
    for name, spec in specs.items():
        if isinstance(spec, dict) and any(spec.get(key) for key in REMOTE_KEYS):
            remote.append(name)
            continue
        file_name = spec.get("file_name") if isinstance(spec, dict) else None
        if not isinstance(file_name, str) or not file_name:
            info.notes.append(f"entry {name!r} names no file_name: not read")
            continue
        named = Path(os.path.abspath(path.parent / file_name))
        if not named.exists():
            absent.append(name)
            continue
        try:
            info.entries[named] = _entry(name, spec)
        except DataError as error:
            info.notes.append(f"entry {name!r}: {error}: {file_name} is read by its content instead")
            continue
        info.notes.extend(f"entry {name!r}: {note}" for note in _not_honoured(spec, file_name))
    if remote:
        info.notes.append("entries on a hub or made by a script, not read (download the files into the directory "
                          f"and name them in file_name): {_listed(remote)}")
    if absent:
        info.notes.append(f"entries whose file_name is not there: {_listed(absent)}")
    return info


def dataset_info(directory: str | Path) -> DatasetInfo | None:
    """The directory's dataset_info.json, read (once while it is unchanged); None if it has none."""
    path = Path(os.path.abspath(directory)) / FILE_NAME
    if not path.is_file():
        return None
    stat = path.stat()
    return _read(path, (stat.st_size, stat.st_mtime_ns))


def entry_for(data_file: str | Path) -> Entry | None:
    """The entry of the nearest dataset_info.json, in the file's folder or one above it, that names the file."""
    data_file = Path(os.path.abspath(data_file))
    for folder in data_file.parents:
        info = dataset_info(folder)
        entry = info.entry_for(data_file) if info else None
        if entry:
            return entry
    return None
