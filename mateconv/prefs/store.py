"""Inputs and outputs of stage 7: the seeded sample of prompts, and the append-only JSONL results that make a run
resumable (one write of a whole line + fsync per record; a torn last line from a hard kill is cut off on resume)."""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import sys
from pathlib import Path

from mateconv.files import OutputDirError, writable_dir, write_atomic
from mateconv.prefs.endpoints import PrefsError

PAIRS, DROPPED, FAILURES, SUMMARY = "dpo_pairs.jsonl", "dropped.jsonl", "failures.jsonl", "summary.json"
FAILURE_HISTORY = "failures_history.jsonl"
ROLES = {"system", "user", "assistant"}


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise PrefsError(f"{where}: expected a non-empty message list or a string")
    for message in value:
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise PrefsError(f"{where}: each message needs a role in {sorted(ROLES)} and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_prompt(raw: dict, where: str) -> dict:
    """{"id", "prompt": [messages ending with a user turn], "source": the line as read} from a line of the tasks
    file ({"id","kind","messages","answer"}), the SFT file ({"id","messages"}: the turns before the last assistant
    reply) or a preference file ({"id","prompt",...})."""
    if not isinstance(raw, dict):
        raise PrefsError(f"{where}: expected a JSON object")
    if "prompt" in raw:
        messages = _messages(raw["prompt"], f"{where} prompt")
    elif "messages" in raw:
        messages = _messages(raw["messages"], f"{where} messages")
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    else:
        raise PrefsError(f"{where}: needs 'messages' or 'prompt'")
    if not messages or messages[-1]["role"] != "user":
        raise PrefsError(f"{where}: the prompt must end with a user message")
    if "id" not in raw or not isinstance(raw["id"], (str, int)):
        raise PrefsError(f"{where}: needs an 'id' (string or integer)")
    return {"id": str(raw["id"]), "prompt": messages, "source": raw}


def sample_rank(line: str, seed: int) -> bytes:
    """Where a line stands in the seeded random order of a prompts file: the first N lines of that order are the
    N-prompt sample, so a larger sample with the same seed contains every smaller one."""
    return hashlib.blake2b(line.strip().encode("utf-8", "surrogateescape"), digest_size=8,
                           key=str(seed).encode()).digest()


def sample_prompts(path: str | Path, n_prompts: int, seed: int) -> list[dict]:
    """The `n_prompts` records first in the seeded random order of `sample_rank` (a uniform sample; one pass with a
    heap, O(n_prompts) memory), in file order. Only the chosen lines are parsed."""
    path = Path(path)
    if path.is_dir():
        raise PrefsError(f"prompts file {path} is a directory: pass a JSONL file in it (--prompts_path)")
    if not path.is_file():
        raise PrefsError(f"prompts file {path} not found (run stage 2 first, or pass --prompts_path)")
    # -sig: without the byte order mark Windows editors put first; surrogateescape: a line that is not UTF-8 is an
    # error naming it once chosen, not a traceback while reading
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as lines:
        chosen = heapq.nsmallest(n_prompts, ((number, line) for number, line in enumerate(lines, 1) if line.strip()),
                                 key=lambda numbered: sample_rank(numbered[1], seed))
    records, ids = [], set()
    for number, line in sorted(chosen):
        where = f"{path}:{number}"
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            raise PrefsError(f"{where}: not UTF-8 text (save the file as UTF-8)") from None
        try:
            record = to_prompt(json.loads(line), where)
        except json.JSONDecodeError as error:
            raise PrefsError(f"{where}: not valid JSON ({error.msg})") from None
        if record["id"] in ids:
            raise PrefsError(f"{where}: duplicate id {record['id']!r}")
        ids.add(record["id"])
        records.append(record)
    if not records:
        raise PrefsError(f"prompts file {path} has no records")
    return records


def repair_torn_tail(path: Path) -> int:
    """Cuts a last line without its newline (a write torn by a hard kill); returns the bytes removed."""
    if not path.exists():
        return 0
    with path.open("rb+") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return 0
        keep = 0
        for start in range(size, 0, -65536):  # scan backwards for the last newline
            file.seek(max(0, start - 65536))
            block = file.read(start - max(0, start - 65536))
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = max(0, start - 65536) + cut + 1
                break
        file.truncate(keep)
        file.flush()
        os.fsync(file.fileno())
        return size - keep


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise PrefsError(f"{path}:{number}: corrupt line ({error.msg}); fix or delete it") from None
    return records


class ResultStore:
    """The output directory: dpo_pairs.jsonl (pairs), dropped.jsonl (ties and small margins: done, no pair),
    failures.jsonl (outstanding failures: retried by the next run unless --skip_failed), failures_history.jsonl
    (failures that were retried since) and summary.json. Each id is in at most one of the first three."""

    def __init__(self, out_dir: str | Path):
        try:
            self.dir = writable_dir(out_dir, "--output_dir")
        except OutputDirError as error:
            raise PrefsError(str(error)) from None
        self.paths = {kind: self.dir / name for kind, name in
                      (("pair", PAIRS), ("dropped", DROPPED), ("failure", FAILURES), ("history", FAILURE_HISTORY))}
        for path in self.paths.values():
            removed = repair_torn_tail(path)
            if removed:
                print(f"prefs: cut a torn last line ({removed} bytes) from {path}", file=sys.stderr)
        for kind in ("pair", "dropped", "failure"):  # each there after a run, empty when it has no record
            self.paths[kind].touch()
        self.files: dict[str, int] = {}

    def ids(self, kind: str) -> set[str]:
        return {str(record["id"]) for record in read_records(self.paths[kind])}

    def done_ids(self, skip_failed: bool) -> set[str]:
        """Ids a new run skips: pairs and dropped prompts, and failures too with `skip_failed`."""
        done = self.ids("pair") | self.ids("dropped")
        return done | self.ids("failure") if skip_failed else done

    def retire_failures(self, ids: set[str]) -> None:
        """Moves the failure records of `ids` (about to be retried) to the history file. A crash in between leaves
        them in both files: they are then retried and retired again, nothing is lost."""
        records = read_records(self.paths["failure"])
        retired = [record for record in records if str(record["id"]) in ids]
        if not retired:
            return
        for record in retired:
            self.append("history", record)
        kept = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records
                       if str(record["id"]) not in ids)
        write_atomic(self.paths["failure"], kept)

    def append(self, kind: str, record: dict) -> None:
        """One os.write of the whole line (O_APPEND) + fsync: a kill leaves a whole line or a torn tail."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            if kind not in self.files:
                self.files[kind] = os.open(self.paths[kind], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(self.files[kind], view):]
            os.fsync(self.files[kind])
        except OSError as error:
            raise PrefsError(f"could not write {self.paths[kind]}: {error.strerror or error}; the prompts written "
                             "before are kept, the same command goes on from them") from None

    def put_in_order(self, ids: list[str]) -> None:
        """Rewrites the pair and dropped files in the order of `ids` (the sampled prompts'), whatever order the
        concurrent requests finished in, so that the same run gives the same files and DPO sees the same batches.
        Records of other ids (an earlier run's sample) follow, in their own order."""
        rank = {id_: index for index, id_ in enumerate(ids)}
        for kind in ("pair", "dropped"):
            records = read_records(self.paths[kind])
            ordered = sorted(records, key=lambda record: rank.get(str(record["id"]), len(rank)))
            if ordered != records:
                write_atomic(self.paths[kind], "".join(json.dumps(record, ensure_ascii=False) + "\n"
                                                       for record in ordered))

    def write_summary(self, summary: dict) -> Path:
        path = self.dir / SUMMARY
        write_atomic(path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return path

    def close(self) -> None:
        for descriptor in self.files.values():
            os.close(descriptor)
        self.files.clear()
