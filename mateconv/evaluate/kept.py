"""Work an interrupted evaluation keeps under out_dir/parts and a rerun reuses: each finished model's results and
each judge verdict, keyed on what they were computed from."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from mateconv.config import is_training_checkpoint
from mateconv.data.readers import files_under
from mateconv.evaluate.metrics import TaskResult
from mateconv.evaluate.models import ModelReport, file_label
from mateconv.files import write_atomic
from mateconv.logprobs import BitsPerByte, Perplexity
from mateconv.prefs.endpoints import Endpoint
from mateconv.train.models import CONSOLIDATED
from mateconv.winrate import WinRate, win_rate


PARTS = "parts"  # under --out_dir: each finished model's results and each judged prompt, reused by a rerun


def file_stats(path: Path | None) -> list:
    """(path, size, mtime) of a file or of every file under a directory: what changes when an input changes. A
    training checkpoint's consolidated model, which its first evaluation writes inside it, is left out."""
    if path is None:
        return []
    files = files_under(path) if path.is_dir() else [path]
    if is_training_checkpoint(path):
        files = [f for f in files if f.relative_to(path).parts[0] != CONSOLIDATED]
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def inputs_key(*inputs) -> str:
    return hashlib.blake2b(json.dumps(inputs, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def kept_report(path: Path, key: str) -> ModelReport | None:
    """The report an earlier run kept at `path` under the same `key` (checkpoint, data and settings), or None."""
    try:
        kept = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if kept.get("key") != key:
        return None
    fields = kept["report"]
    try:
        return ModelReport(**{**fields, "ppl": fields["ppl"] and Perplexity(**fields["ppl"]),
                              "bpb": fields["bpb"] and BitsPerByte(**fields["bpb"]),
                              "tasks": fields["tasks"] and TaskResult(**fields["tasks"]), "win_rates": []})
    except (KeyError, TypeError):  # kept by a version whose results had other fields: evaluated again
        return None


def keep_report(path: Path, key: str, report: ModelReport) -> None:
    write_atomic(path, json.dumps({"key": key, "report": dataclasses.asdict(report)}, ensure_ascii=False))


def kept_verdicts(path: Path, key: str) -> dict[int, str]:
    """The judged prompts of a comparison an earlier run kept at `path` (a first line with the comparison's key, then
    one {"prompt", "verdict"} line per judged prompt) when the key is `key`. The file is rewritten with them alone (a
    line cut short by a crash dropped), so that new verdicts are appended after whole lines."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    verdicts = {}
    if lines and lines[0] == json.dumps({"key": key}):
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                if entry["verdict"] in ("win", "loss", "tie"):
                    verdicts[int(entry["prompt"])] = entry["verdict"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # a line cut short
                continue
    write_atomic(path, "".join(json.dumps(entry) + "\n" for entry in
                               [{"key": key}, *({"prompt": i, "verdict": v} for i, v in verdicts.items())]))
    return verdicts


def judged_win_rate(judge: Endpoint, pair: tuple[str, str], prompts: list[list[dict]], replies: dict[str, list[str]],
                    parts: Path, seed: int, retries: int, concurrency: int) -> WinRate:
    """The win rate of a (model, baseline) pair, each verdict kept in `parts` as it comes and those an earlier run
    kept on the same prompts, replies, judge model and seed reused."""
    model, baseline = pair
    path = parts / f"winrate_{file_label(model)}_vs_{file_label(baseline)}.jsonl"
    kept = kept_verdicts(path, inputs_key(judge.model, seed, prompts, replies[model], replies[baseline]))
    if kept:
        print(f"[evaluate] win rate {model} vs {baseline}: {len(kept)} of {len(prompts)} prompts judged by an "
              f"earlier run reused ({path})", flush=True)
    with path.open("a", encoding="utf-8") as log:
        def keep(index: int, verdict: str) -> None:
            log.write(json.dumps({"prompt": index, "verdict": verdict}) + "\n")
            log.flush()

        return win_rate(judge, pair, prompts, replies, seed, retries, concurrency, kept=kept, on_verdict=keep)
