"""Stage 2: raw corpora -> cleaned, deduplicated, converted, split `out/data/{kind}_{train,val}.jsonl` + stats.json.

    python -m mateconv.data.prepare --raw_dir out/raw/embedded --out_dir out/data
    python -m mateconv.data.prepare --pretrain ../shared/data/karpathy__char-rnn --sft alpaca_zh_demo.json \
        --dpo dpo_zh_demo.json hf:owner/name --out_dir out/data

Kinds: pretrain (text), sft (internal messages format), dpo (TRL preference format), tasks (verifiable prompts,
passed through). A record's own `"split"` field ("train"/"val") is kept; otherwise a seeded hash of its content
decides, so the split never changes when files are re-read in another order. `--prompts_frac` also holds a share of
the SFT training conversations out of SFT (`sft_prompts.jsonl`, at most `--max_prompts`): prompts for stage 7.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import asdict
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mateconv.data import DataError
from mateconv.data.clean import (DEFAULT_NORMALIZATION, NORMALIZATIONS, Deduper, Filters, length_summary,
                                 many_minhash_values, normalize, split_of)
from mateconv.data.dataset_info import FILE_NAME as DATASET_INFO, dataset_info
from mateconv.data.formats import check_pair, check_turns, to_preference, to_sft
from mateconv.data.pool import in_order
from mateconv.data.readers import BadLine, ReadProgress, iter_sources, list_files, path_list, record_text
from mateconv.data.sources import recognize, skipped
from mateconv.files import dirs_to_make, remove_empty_dirs, write_atomic
from mateconv.flags import ArgumentParser, DefaultsHelpFormatter
from mateconv.terminal import PlainProgress, bars_only_on_a_terminal, exit_interrupted, run_main, signals_interrupt

KINDS = ("pretrain", "sft", "dpo", "tasks")
OUTPUTS = [f"{kind}_{split}.jsonl" for kind in KINDS for split in ("train", "val")] + ["sft_prompts.jsonl"]
MAX_BAD_EXAMPLES = 20
PROGRESS_EVERY = 1.0  # seconds between looks at how far the input has been read


def raw_dir_sources(raw_dir: str | Path) -> dict[str, list[Path]]:
    """Files of a raw directory grouped by kind: the kind a LLaMA-Factory dataset_info.json there gives the files it
    names (`ranking` pairs, pretraining text, else SFT), else the kind the file's name starts with (pretrain*, sft*,
    dpo*, tasks*), else the kind its content has, as `--data` finds it. The entries of dataset_info.json that are not
    read, and the files of no known kind, are printed, one line per reason."""
    info = dataset_info(raw_dir)
    for note in info.notes if info else []:
        print(f"{info.path}: {note}", file=sys.stderr)
    sources: dict[str, list[Path]] = {}
    for path in list_files([raw_dir]):
        entry = info.entry_for(path) if info else None
        kind = entry.kind if entry else next((k for k in KINDS if path.name.startswith(k)), None)
        if kind is None and path.name != DATASET_INFO:
            found = skipped(path) or recognize(path)
            kind = found.kind
            if kind is None:
                print(found.line(), file=sys.stderr)
        if kind:
            sources.setdefault(kind, []).append(path)
    if not sources:
        raise DataError(f"{raw_dir}: no pretraining text, SFT conversations, preference pairs or tasks (the lines "
                        "above say why each file was skipped)")
    return sources


def _convert(kind: str, record: Any, form: str) -> tuple[dict, str]:
    """The cleaned output record (without id/split) and the text used for filters and dedup."""
    if kind == "pretrain":
        text = normalize(record_text(record), form)
        return {"text": text}, text
    if kind == "sft":
        messages = [{**m, "content": normalize(m["content"], form)} for m in to_sft(record)["messages"]]
        check_turns(messages)  # normalising can empty a turn
        return {"messages": messages}, "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    if kind == "dpo":
        pair = {side: [{**m, "content": normalize(m["content"], form)} for m in messages]
                for side, messages in to_preference(record).items()}
        check_pair(pair)  # normalising can empty a reply or make the two equal
        chosen, rejected = (pair[side][0]["content"] for side in ("chosen", "rejected"))
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in pair["prompt"])
        return pair, f"{prompt}\nchosen: {chosen}\nrejected: {rejected}"
    if not (isinstance(record, dict) and isinstance(record.get("messages"), list) and "answer" in record):
        raise DataError("a task record needs 'messages' and 'answer'")
    task = {key: value for key, value in record.items() if key not in ("id", "split")}
    task["messages"] = [{**m, "content": normalize(str(m.get("content", "")), form)} for m in record["messages"]]
    return task, json.dumps(task, ensure_ascii=False, sort_keys=True)


def _record_id(record: Any, kind: str, read: int, taken: set[str] | None) -> str:
    """The record's own id, else f"{kind}-{read}". An id in `taken` (files that number their records alike) gets
    f"-{read}" appended: stage 7 and the evaluation tell conversations, pairs and tasks apart by their ids."""
    own = record.get("id") if isinstance(record, dict) else None
    record_id = f"{kind}-{read}" if own is None else str(own)
    if taken is not None:
        record_id = f"{record_id}-{read}" if record_id in taken else record_id
        taken.add(record_id)
    return record_id


def _checked(kind: str, sources: list[str | Path], form: str, filters: Filters, deduper: Deduper, workers: int,
             chunk_records: int = 256) -> Iterator[tuple[str, int, Any, dict | None, str, str | None]]:
    """(source, line, record, output, text, reason) of every record of the sources, in their order: reason None keeps
    it, else it is "bad_record" (text is then the error), a filter's or "exact_dup" / "near_dup". The MinHash values
    (most of the time) are computed by `workers` processes, at most 4 chunks per worker ahead of the LSH index,
    which takes them in the input's order, so the outputs are those of one process."""

    def screened() -> Iterator[tuple]:  # all but the near-duplicate check
        for source, number, record in iter_sources(sources):
            try:
                if isinstance(record, BadLine):
                    raise DataError(record.error)
                output, text = _convert(kind, record, form)
            except DataError as error:
                yield source, number, record, None, str(error), "bad_record"
                continue
            reason = None if kind == "tasks" else filters.reason(text, pretraining=kind == "pretrain")
            if reason is None and deduper.seen_exact(text):
                reason = "exact_dup"
            yield source, number, record, output, text, reason

    def wants_minhash(item: tuple) -> bool:
        return item[5] is None and deduper.wants_minhash(item[4])

    def near_checked(chunk: list[tuple], values: list) -> Iterator[tuple]:
        values = iter(values)
        for item in chunk:
            yield item[:5] + ("near_dup",) if wants_minhash(item) and deduper.seen_near(next(values)) else item

    def minhash_job(chunk: list[tuple]) -> partial:
        texts = [item[4] for item in chunk if wants_minhash(item)]
        return partial(many_minhash_values, texts, deduper.num_perm, deduper.seed, deduper.shingle)

    items = screened()
    chunks = iter(lambda: list(islice(items, chunk_records)), [])
    results = in_order(chunks, minhash_job, workers if deduper.near is not None else 1, 4 * workers)
    try:
        with closing(results):
            for chunk, values in results:
                yield from near_checked(chunk, values)
    except BrokenProcessPool:
        raise DataError("a MinHash worker died (killed, perhaps for lack of memory); fewer --workers use less "
                        "memory") from None


def prepare_kind(kind: str, sources: list[str | Path], out_dir: Path, filters: Filters, deduper: Deduper,
                 val_frac: float, seed: int, form: str, progress: bool = True, prompts_frac: float = 0.0,
                 max_prompts: int = 0, workers: int = 1) -> tuple[dict, list[Path]]:
    """Clean, filter, dedup and split one kind; writes {kind}_train.jsonl / {kind}_val.jsonl (and for SFT with
    prompts_frac > 0 sft_prompts.jsonl: training conversations held out of SFT), each as its path + ".tmp" that the
    caller renames; returns its stats and those paths."""
    sources = path_list(sources)
    removed: Counter = Counter()
    bad_examples: list[str] = []
    bad_sources: set[str] = set()
    hold_out = kind == "sft" and prompts_frac > 0
    lengths: dict[str, list[int]] = {"train": [], "val": [], **({"prompts": []} if hold_out else {})}
    paths = {split: out_dir / f"{kind}_{split}.jsonl" for split in lengths}
    input_read = ReadProgress(sources)  # before the files: a path that is not there is an error here
    files = {split: open(f"{path}.tmp", "w", encoding="utf-8") for split, path in paths.items()}
    read = 0
    ids: set[str] | None = None if kind == "pretrain" else set()  # nothing reads pretraining ids: no set of millions
    last_train = None  # the last training record's line, while the hash (not its own "split") put it there
    bar = tqdm(total=input_read.total or None, unit="B", unit_scale=True, desc=f"prepare {kind}", disable=not progress,
               mininterval=1.0)
    plain = PlainProgress(f"prepare {kind}", input_read.total / 1e6, "MB", enabled=progress)
    shown = -math.inf
    checked = _checked(kind, sources, form, filters, deduper, workers)
    try:
        for source, number, record, output, text, reason in checked:
            read += 1
            input_read.reading(source)
            if time.monotonic() - shown >= PROGRESS_EVERY:
                shown = time.monotonic()
                bar.update(input_read.done() - bar.n)
                bar.set_postfix(records=read, refresh=False)
                plain.update(bar.n / 1e6, records=read)
            if reason:
                removed[reason] += 1
                # the first ones, and each file's first: a noisy file must not hide another's cut or encoding
                if reason == "bad_record" and (len(bad_examples) < MAX_BAD_EXAMPLES or source not in bad_sources):
                    bad_examples.append(f"{source}:{number}: {text}")
                    bad_sources.add(source)
                continue
            given = record.get("split") if isinstance(record, dict) else None
            split = given if given in ("train", "val") else split_of(text, val_frac, seed)
            if (hold_out and split == "train" and split_of(text, prompts_frac, seed + 1) == "val"
                    and not (max_prompts and len(lengths["prompts"]) >= max_prompts)):
                split = "prompts"
            line = json.dumps({"id": _record_id(record, kind, read, ids), **output}, ensure_ascii=False) + "\n"
            if split == "train":
                last_train = None if given == "train" else line
            files[split].write(line)
            lengths[split].append(len(text))
        bar.update(input_read.total - bar.n)
        plain.update(bar.n / 1e6, records=read)
        if val_frac > 0 and not lengths["val"] and len(lengths["train"]) > 1 and last_train:
            # a small corpus the hash held nothing out of: its last training record validates every later stage
            files["train"].flush()
            files["train"].truncate(files["train"].tell() - len(last_train.encode("utf-8")))
            files["val"].write(last_train)
            lengths["val"].append(lengths["train"].pop())
    except BaseException:
        for f in files.values():
            f.close()
            os.unlink(f.name)
        raise
    finally:
        checked.close()  # its process pool ends now, not when the garbage collector finds it
        bar.close()
    for f in files.values():
        f.close()
    kept = {split: len(values) for split, values in lengths.items()}
    return {"read": read, "kept": sum(kept.values()), **kept,
            "removed": dict(sorted(removed.items())), "bad_examples": bad_examples,
            "chars": {split: length_summary(values) for split, values in lengths.items()},
            "sources": [str(s) for s in sources]}, list(paths.values())


def prepare(sources: dict[str, list[str | Path]], out_dir: str | Path = "out/data", val_frac: float = 0.05,
            seed: int = 0, filters: Filters | None = None, near_dup_threshold: float = 0.85, num_perm: int = 64,
            normalization: str = DEFAULT_NORMALIZATION, progress: bool = True, prompts_frac: float = 0.0,
            max_prompts: int = 0, workers: int = 0) -> dict:
    """Prepare every kind that has sources; writes the jsonl files and stats.json, returns the stats. The outputs of
    a run replace all of an earlier run's (a kind not prepared now leaves no file), and only when every kind is
    done: a run that fails leaves out_dir as it was (not there, when the run made it). `workers` processes compute
    the MinHash values of pretraining text (0: one per core); the outputs are the same for any number."""
    unknown = set(sources) - set(KINDS)
    if unknown:
        raise DataError(f"unknown data kind(s) {sorted(unknown)}; expected {', '.join(KINDS)}")
    if not 0 <= val_frac < 1:
        raise DataError(f"val_frac must be in [0, 1), got {val_frac}")
    if not 0 <= prompts_frac < 1 or max_prompts < 0:
        raise DataError(f"prompts_frac must be in [0, 1) and max_prompts >= 0, got {prompts_frac}, {max_prompts}")
    if workers < 0:
        raise DataError(f"workers must be >= 0 (0: one per core), got {workers}")
    filters = filters or Filters()
    out_dir = Path(out_dir)
    created = dirs_to_make(out_dir)  # removed again by a run that fails
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"settings": {"val_frac": val_frac, "prompts_frac": prompts_frac,
                                          "max_prompts": max_prompts, "seed": seed, "normalization": normalization,
                                          "near_dup_threshold": near_dup_threshold, "num_perm": num_perm,
                                          "filters": asdict(filters)}}
    written: list[Path] = []
    try:
        for kind in KINDS:
            if sources.get(kind):
                # Conversations, pairs and tasks: exact duplicates only. Distinct examples that share a long system
                # prompt or passage look alike to MinHash (LLaMA-Factory and TRL remove no near duplicates either).
                deduper = Deduper(near_dup_threshold if kind == "pretrain" else 1.0, num_perm)
                stats[kind], paths = prepare_kind(kind, sources[kind], out_dir, filters, deduper, val_frac, seed,
                                                  normalization, progress, prompts_frac, max_prompts,
                                                  workers or os.cpu_count() or 1)
                written += paths
    except BaseException:
        for path in written:
            os.unlink(f"{path}.tmp")
        remove_empty_dirs(created)
        raise
    for name in OUTPUTS:
        if out_dir / name not in written:
            (out_dir / name).unlink(missing_ok=True)
    for path in written:
        os.replace(f"{path}.tmp", path)
    write_atomic(out_dir / "stats.json", json.dumps(stats, ensure_ascii=False, indent=2))
    return stats


def summary_table(stats: dict) -> str:
    """A markdown table of the stats: one row per kind, then every bad record example (file:line: reason)."""
    rows = ["| kind | read | kept | train | val | removed |", "|---|---|---|---|---|---|"]
    bad = []
    for kind in KINDS:
        if kind in stats:
            s = stats[kind]
            removed = ", ".join(f"{k} {v}" for k, v in s["removed"].items()) or "-"
            held = f" (+{s['prompts']} held out as prompts)" if "prompts" in s else ""
            rows.append(f"| {kind} | {s['read']} | {s['kept']} | {s['train']}{held} | {s['val']} | {removed} |")
            count = s["removed"].get("bad_record", 0)
            if count:
                others = ", then the first in each other file" if len(s["bad_examples"]) > MAX_BAD_EXAMPLES else ""
                more = f" (the first {MAX_BAD_EXAMPLES} below{others})" if count > len(s["bad_examples"]) else ""
                bad += [f"{kind}: {count} bad record(s) skipped{more}:"] + [f"  {e}" for e in s["bad_examples"]]
    return "\n".join(rows + bad)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m mateconv.data.prepare",
                            description="Stage 2: clean, dedup, convert and split raw data (docs/data.md).",
                            formatter_class=DefaultsHelpFormatter)
    group = parser.add_argument_group("inputs (files, directories, hf:owner/name or ms:owner/name)")
    group.add_argument("--raw_dir", help="directory of data files: pretrain*, sft*, dpo*, tasks* by their names, "
                       "the files a dataset_info.json names by its entries, others by their content")
    for kind in KINDS:
        group.add_argument(f"--{kind}", nargs="+", default=[], metavar="PATH")
    parser.add_argument("--out_dir", default="out/data")
    parser.add_argument("--val_frac", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normalization", default=DEFAULT_NORMALIZATION, choices=NORMALIZATIONS)
    parser.add_argument("--prompts_frac", type=float, default=0.0,
                        help="share of SFT training conversations held out as stage 7 prompts (sft_prompts.jsonl)")
    parser.add_argument("--max_prompts", type=int, default=0, help="at most this many held out (0 = no cap)")
    group = parser.add_argument_group("filters")
    for name, value in asdict(Filters()).items():
        group.add_argument(f"--{name}", type=type(value), default=value)
    group.add_argument("--near_dup_threshold", type=float, default=0.85,
                       help="MinHash Jaccard, pretraining text; 1 disables")
    group.add_argument("--num_perm", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0,
                        help="processes computing the MinHash values of pretraining text (0 = all cores)")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    bars_only_on_a_terminal()
    try:
        # `kill -2` (also of a script's background job, which comes with SIGINT ignored), `kill` or Ctrl-C ends the
        # run with out_dir as it was, the pool ended, not left to break
        with signals_interrupt():
            sources: dict[str, list] = raw_dir_sources(args.raw_dir) if args.raw_dir else {}
            for kind in KINDS:
                sources[kind] = list(sources.get(kind, [])) + getattr(args, kind)
            if not any(sources.values()):
                parser.error("give --raw_dir or at least one of --pretrain/--sft/--dpo/--tasks")
            filters = Filters(**{name: getattr(args, name) for name in asdict(Filters())})
            stats = prepare(sources, args.out_dir, args.val_frac, args.seed, filters, args.near_dup_threshold,
                            args.num_perm, args.normalization, not args.no_progress, args.prompts_frac,
                            args.max_prompts, args.workers)
    except DataError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        exit_interrupted(f"prepare: interrupted; {args.out_dir} is as it was before this run")
    print(summary_table(stats))
    print(f"written to {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
