"""Stage 3: tokenize prepared data in parallel into memory-mapped token shards (their layout: mateconv/data/shards.py).

Shard k holds input records [k * records_per_shard, (k + 1) * records_per_shard). Shards are written as `*.tmp`
and renamed when finished; index.json (rewritten atomically after each shard) lists only finished shards, so an
interrupted run resumes where it stopped and never trusts a half-written file.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from mateconv.chat_format import BOS, EOS, PAD, has_chatml, render_chat
from mateconv.data import DataError, read_tokenizer
from mateconv.data.clean import split_of
from mateconv.data.formats import to_preference, to_sft
from mateconv.data.pool import in_order
from mateconv.data.readers import (BadLine, iter_records, list_files, opens_array, record_text, refuse_not_text,
                                   text_lines)
from mateconv.data.shards import FORMAT_VERSION, KINDS, shard_info
from mateconv.files import remove_empty_dirs, write_atomic
from mateconv.flags import ArgumentParser, DefaultsHelpFormatter
from mateconv.terminal import (PlainProgress, bars_only_on_a_terminal, exit_interrupted, run_main,
                               signals_interrupt)

BAD_LINE = "\0"  # opens a line that could not be read (never valid JSON); the rest is the reason


# ---------------------------------------------------------------- tokenizing (worker side)

_tokenizer = None


def _init_worker(tokenizer_file: str) -> None:
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the process pool
    _tokenizer = Tokenizer.from_file(tokenizer_file)


def _encode_sft(record: Any) -> tuple[list[int], list[int]]:
    text, spans = render_chat(to_sft(record)["messages"])
    encoding = _tokenizer.encode(text, add_special_tokens=False)
    starts = [span[0] for span in spans]
    mask = []
    for start, _ in encoding.offsets:
        k = bisect.bisect_right(starts, start) - 1
        mask.append(1 if k >= 0 and start < spans[k][1] else 0)
    return encoding.ids, mask


def _encode_dpo(record: Any, eos_id: int) -> tuple[list[int], list[int], list[int]]:
    pair = to_preference(record)
    prompt_text, _ = render_chat(pair["prompt"], add_generation_prompt=True)
    prompt = _tokenizer.encode(prompt_text, add_special_tokens=False).ids
    chosen, rejected = (_tokenizer.encode(pair[side][0]["content"], add_special_tokens=False).ids + [eos_id]
                        for side in ("chosen", "rejected"))
    return prompt, chosen, rejected


def encode_chunk(kind: str, eos_id: int, dtype: str, lines: list[tuple[int, int, str]]) -> dict:
    """Parse and tokenize one chunk of (source id, line number, raw line) -> arrays + per-record errors."""
    tokens: list[int] = []
    mask: list[int] = []
    lengths: list[int] = []
    errors: list[tuple[int, int, str]] = []
    for source, number, raw in lines:
        if raw.startswith(BAD_LINE):
            errors.append((source, number, raw[len(BAD_LINE):]))
            continue
        try:
            record = json.loads(raw)
            if kind == "pretrain":
                text = record_text(record)
                if not text.strip():
                    raise DataError("empty text")
                ids = _tokenizer.encode(text, add_special_tokens=False).ids + [eos_id]
                tokens += ids
                lengths.append(len(ids))
            elif kind == "sft":
                ids, record_mask = _encode_sft(record)
                if not any(record_mask):
                    raise DataError("no assistant tokens")
                tokens += ids
                mask += record_mask
                lengths.append(len(ids))
            else:
                for part in _encode_dpo(record, eos_id):
                    tokens += part
                    lengths.append(len(part))
        except json.JSONDecodeError as error:
            errors.append((source, number, f"malformed JSON: {error.msg}"))
        except (DataError, KeyError, TypeError, AttributeError) as error:
            errors.append((source, number, f"{type(error).__name__}: {error}" if not isinstance(error, DataError)
                           else str(error)))
    return {"tokens": np.asarray(tokens, dtype=dtype), "mask": np.asarray(mask, dtype=np.uint8),
            "lengths": np.asarray(lengths, dtype=np.int64), "errors": errors}


# ---------------------------------------------------------------- writing (main side)

@dataclass
class BuildResult:
    out_dir: Path
    index: dict
    skipped_shards: int = 0
    bad_records: list[str] = field(default_factory=list)


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, ensure_ascii=False, indent=1))


def _fingerprint(kind: str, files: list[Path], tokenizer_file: Path, records_per_shard: int,
                 hold_out: tuple[str, float] | None) -> str:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{FORMAT_VERSION}|{kind}|{records_per_shard}".encode())
    if hold_out:
        digest.update(f"|{hold_out}".encode())
    digest.update(tokenizer_file.read_bytes())
    for path in files:
        stat = path.stat()
        digest.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _lines(files: list[Path]) -> Iterator[tuple[int, int, str, int]]:
    """(source id, line number, raw JSON line, bytes) read lazily; other file types are re-serialised per record. A
    line that cannot be read is BAD_LINE and its reason, which the worker reports."""
    for source, path in enumerate(files):
        if path.name.endswith(".jsonl") and not opens_array(path):  # parsed by the workers
            refuse_not_text(path)
            for number, line in text_lines(path):
                line = BAD_LINE + line.error if isinstance(line, BadLine) else line
                if line.strip():
                    yield source, number, line, len(line.encode()) + 1
        else:
            for _, number, record in iter_records(path):
                bad = isinstance(record, BadLine)
                line = BAD_LINE + record.error if bad else json.dumps(record, ensure_ascii=False)
                yield source, number, line, len(line.encode())


def _chunks(files: list[Path], records_per_shard: int, chunk_records: int, skip_shards: set[int],
            hold_out: tuple[str, float] | None) -> Iterator[tuple[int, list[tuple[int, int, str]], int]]:
    """(shard id, chunk of lines, bytes) never crossing a shard boundary; lines of finished shards are skipped, and
    with hold_out (split, fraction) the lines `split_of` puts in the other split (their bytes count for progress)."""
    chunk: list[tuple[int, int, str]] = []
    nbytes = 0
    position = 0
    for source, number, line, size in _lines(files):
        if hold_out and split_of(line, hold_out[1]) != hold_out[0]:
            nbytes += size
            continue
        shard = position // records_per_shard
        position += 1
        if shard in skip_shards:
            yield shard, [], size
            continue
        chunk.append((source, number, line))
        nbytes += size
        if len(chunk) == chunk_records or position % records_per_shard == 0:
            yield shard, chunk, nbytes
            chunk, nbytes = [], 0
    if chunk or nbytes:
        yield max(0, position - 1) // records_per_shard, chunk, nbytes


class _ShardWriter:
    """Appends chunk results to `part-NNNNN.*.tmp` files, renames them when the shard is finished."""

    def __init__(self, out_dir: Path, kind: str):
        self.out_dir, self.kind = out_dir, kind
        self.shard: int | None = None
        self.files: dict[str, Any] = {}
        self.num_tokens = self.num_records = self.offset = 0

    def parts(self) -> tuple[str, ...]:
        return {"pretrain": ("tokens", "offsets"), "sft": ("tokens", "mask", "offsets"),
                "dpo": ("tokens", "offsets")}[self.kind]

    def open(self, shard: int) -> None:
        self.shard = shard
        name = f"part-{shard:05d}"
        self.files = {part: open(self.out_dir / f"{name}.{part}.bin.tmp", "wb") for part in self.parts()}
        self.num_tokens = self.num_records = self.offset = 0
        if "offsets" in self.files:
            self.files["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())

    def add(self, result: dict) -> None:
        self.files["tokens"].write(result["tokens"].tobytes())
        if "mask" in self.files:
            self.files["mask"].write(result["mask"].tobytes())
        if "offsets" in self.files:
            ends = self.offset + np.cumsum(result["lengths"])
            self.files["offsets"].write(ends.astype(np.int64).tobytes())
        self.offset += int(result["lengths"].sum())
        self.num_tokens += len(result["tokens"])
        per_record = 3 if self.kind == "dpo" else 1
        self.num_records += len(result["lengths"]) // per_record

    def close(self) -> dict:
        name = f"part-{self.shard:05d}"
        for part, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.out_dir / f"{name}.{part}.bin.tmp", self.out_dir / f"{name}.{part}.bin")
        self.shard, self.files = None, {}
        return {"name": name, "num_tokens": self.num_tokens, "num_records": self.num_records}


def _finished_shards(out_dir: Path, index: dict, kind: str) -> list[dict]:
    """Shards listed in a previous index whose files all exist with the listed size (anything else is redone)."""
    parts = _ShardWriter(out_dir, kind).parts()
    itemsize = np.dtype(index.get("dtype", "uint16")).itemsize
    return [s for s in index.get("shards", [])
            if all((out_dir / f"{s['name']}.{p}.bin").is_file() for p in parts)
            and (out_dir / f"{s['name']}.tokens.bin").stat().st_size == s["num_tokens"] * itemsize]


def declared_token(tokenizer_dir: Path, role: str) -> str | None:
    """The `eos_token`/`pad_token` a Hugging Face tokenizer declares in its tokenizer_config.json (a string, or an
    AddedToken's dict), or None."""
    config_file = tokenizer_dir / "tokenizer_config.json"
    value = json.loads(config_file.read_text(encoding="utf-8")).get(role) if config_file.is_file() else None
    return value.get("content") if isinstance(value, dict) else value


def _vocabulary(tokenizer_file: Path, kind: str = "pretrain") -> dict:
    """What an index records about the tokenizer: vocab_size, eos_id, pad_id and the token dtype. The end of a
    document (and of an answer) is ChatML's <|im_end|>; a tokenizer without ChatML (an HF model's: Pythia, Llama, GPT-2)
    ends pretraining documents with its own eos_token and pads with its pad_token, else that eos."""
    if not tokenizer_file.is_file():
        raise DataError(f"{tokenizer_file.parent}: no tokenizer.json (train one with stage 1)")
    tokenizer = read_tokenizer(tokenizer_file)
    vocab_size = tokenizer.get_vocab_size()
    chatml = has_chatml(tokenizer)
    if kind in ("sft", "dpo") and not chatml:
        raise DataError(f"{tokenizer_file} has no {BOS} / {EOS} tokens: {kind.upper()} conversations are written in "
                        "ChatML (5.full_sft.py --init_from MODEL adds them to a model's tokenizer and embeddings)")

    def token_id(*tokens) -> int | None:
        return next((i for t in tokens if t and (i := tokenizer.token_to_id(t)) is not None), None)

    own_eos = declared_token(tokenizer_file.parent, "eos_token")
    eos_id = token_id(EOS if chatml else None, own_eos)
    pad_id = token_id(PAD if chatml else None, declared_token(tokenizer_file.parent, "pad_token"), own_eos)
    if eos_id is None:
        raise DataError(f"{tokenizer_file} has no end-of-text token to end documents with: neither {EOS} nor an "
                        "eos_token in tokenizer_config.json")
    return {"dtype": "uint16" if vocab_size <= 1 << 16 else "uint32", "vocab_size": vocab_size, "eos_id": eos_id,
            "pad_id": pad_id}


def write_sft_rows(rows: list[list[int]], tokenizer_dir: str | Path, out_dir: str | Path) -> Path:
    """One SFT shard of ready-made token rows, every token trained (a loss mask of ones): for replaying another
    trainer's rows with ours, e.g. MiniMind's truncated pretraining rows in benchmarks/bench_vs_minimind.py."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = _vocabulary(Path(tokenizer_dir) / "tokenizer.json")
    tokens = np.asarray([t for row in rows for t in row], dtype=vocab["dtype"])
    writer = _ShardWriter(out_dir, "sft")
    writer.open(0)
    writer.add({"tokens": tokens, "mask": np.ones(len(tokens), dtype=np.uint8),
                "lengths": np.asarray([len(row) for row in rows])})
    index = {"kind": "sft", **vocab, "shards": [writer.close()], "complete": True, "format_version": FORMAT_VERSION,
             "inputs": [], "tokenizer": str(tokenizer_dir), "bad_records": 0, "bad_examples": []}
    _write_json_atomic(out_dir / "index.json", index)
    return out_dir


def build_shards(kind: str, inputs: list[str | Path], tokenizer_dir: str | Path, out_dir: str | Path,
                 workers: int | None = None, records_per_shard: int = 100_000, chunk_records: int = 256,
                 strict: bool = False, max_in_flight: int | None = None, progress: bool = True,
                 hold_out: tuple[str, float] | None = None) -> BuildResult:
    """Tokenize `inputs` (jsonl/txt/json files or directories) into token shards in out_dir; resumable. hold_out
    (split, fraction) keeps only that split of a stable hash split of the records (`split_of`): ("val", 0.05) and
    ("train", 0.05) are disjoint and together all of them."""
    if kind not in KINDS:
        raise DataError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    files = list_files(inputs)
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    vocab = _vocabulary(tokenizer_file, kind)
    workers = workers or os.cpu_count() or 1
    chunk_records = max(1, min(chunk_records, records_per_shard))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / "index.json"
    fingerprint = _fingerprint(kind, files, tokenizer_file, records_per_shard, hold_out)
    previous = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if previous.get("fingerprint") == fingerprint and previous.get("complete"):
        return BuildResult(out_dir, previous, skipped_shards=len(previous["shards"]))
    done = _finished_shards(out_dir, previous, kind) if previous.get("fingerprint") == fingerprint else []
    done_names = {s["name"] for s in done}
    for stale in out_dir.glob("part-*"):  # half-written tmp files and shards of other inputs/settings
        if stale.name.split(".")[0] not in done_names or stale.name.endswith(".tmp"):
            stale.unlink()

    eos_id, dtype = vocab["eos_id"], vocab["dtype"]
    index = {"kind": kind, **vocab, "shards": sorted(done, key=lambda s: s["name"]), "complete": False,
             "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "inputs": [str(p) for p in files],
             "tokenizer": str(tokenizer_dir), "records_per_shard": records_per_shard, "bad_records": 0,
             "bad_examples": []}
    _write_json_atomic(index_path, index)
    bad: list[str] = []
    skip = {int(name.split("-")[1]) for name in done_names}
    writer = _ShardWriter(out_dir, kind)
    total_bytes = sum(p.stat().st_size for p in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenize {kind}", disable=not progress,
               mininterval=1.0)
    plain = PlainProgress(f"tokenize {kind}", total_bytes / 1e6, "MB", enabled=progress)
    tokens_total = 0

    def consume(shard: int, result: dict | None, nbytes: int) -> None:
        nonlocal tokens_total
        bar.update(nbytes)
        if result is not None:
            if writer.shard != shard:
                finish()
                writer.open(shard)
            for source, number, message in result["errors"]:
                where = f"{files[source]}:{number}: {message}"
                if strict:
                    raise DataError(f"{where} (strict mode)")
                bad.append(where)
            writer.add(result)
            tokens_total += len(result["tokens"])
            bar.set_postfix(tokens=tokens_total, refresh=False)
        plain.update(bar.n / 1e6, tokens=tokens_total)

    def finish() -> None:
        if writer.shard is not None:
            index["shards"].append(writer.close())
            index["shards"].sort(key=lambda s: s["name"])
            _write_json_atomic(index_path, index)

    def job(chunk: tuple) -> partial | None:
        _, lines, _ = chunk
        return partial(encode_chunk, kind, eos_id, dtype, lines) if lines else None

    results = in_order(_chunks(files, records_per_shard, chunk_records, skip, hold_out), job, workers,
                       max_in_flight or 4 * workers, _init_worker, (str(tokenizer_file),))
    try:
        with closing(results):
            for (shard, _, nbytes), result in results:
                consume(shard, result, nbytes)
        finish()
    except BrokenProcessPool:
        raise DataError(f"a tokenizing worker died (killed, perhaps for lack of memory): the finished shards are kept "
                        f"and the same command goes on from them; fewer --workers use less memory "
                        f"({len(index['shards'])} shard(s) done)") from None
    finally:
        bar.close()
        for f in writer.files.values():
            f.close()
    if bad and not any(shard["num_records"] for shard in index["shards"]):  # nothing to train on
        index["shards"] = []  # none counts as done: a run again reads the inputs again, and says why again
        _write_json_atomic(index_path, index)
        raise DataError(f"no usable {kind} record: all {len(bad)} were bad, e.g. {bad[0]}")
    index.update(complete=True, bad_records=len(bad), bad_examples=bad[:50])
    _write_json_atomic(index_path, index)
    return BuildResult(out_dir, index, skipped_shards=len(done), bad_records=bad)


# ---------------------------------------------------------------- command line

def made_from(shard_dir: Path) -> list[str] | None:
    """The input files a shard directory was tokenized from (its index.json), None where it holds no index."""
    try:
        return json.loads((shard_dir / "index.json").read_text()).get("inputs")
    except (OSError, ValueError):
        return None


def build_all(data_dir: str | Path, tokenizer_dir: str | Path, out_root: str | Path, **options) -> list[BuildResult]:
    """Every `{kind}_{split}.jsonl` found in data_dir (stage 2's output) -> out_root/kind/split. Then the shards made
    from a file of data_dir that is no longer there are removed, with a line each: stage 2 replaces all of an earlier
    run's files, and the training stages would read the shards it left. Shards made from other files are kept."""
    every = [(kind, split, Path(data_dir) / f"{kind}_{split}.jsonl") for kind in KINDS for split in ("train", "val")]
    found = [(kind, split, path) for kind, split, path in every if path.is_file()]
    if not found:
        raise DataError(f"{data_dir}: no pretrain/sft/dpo _train/_val .jsonl files (run stage 2 first)")
    results = [build_shards(kind, [path], tokenizer_dir, Path(out_root) / kind / split, **options)
               for kind, split, path in found]
    for kind, split, path in every:
        stale = Path(out_root) / kind / split
        if not path.is_file() and made_from(stale) == [str(path)]:  # shards of other files are not this run's
            shutil.rmtree(stale)
            remove_empty_dirs([stale.parent])
            print(f"{stale}: removed, as {data_dir} has no {path.name} any more (stage 2 did not write it this time)")
    return results


def _report(result: BuildResult) -> None:
    info = shard_info(result.out_dir)
    note = f", {result.skipped_shards} shard(s) already done" if result.skipped_shards else ""
    print(f"{result.out_dir}: {info['kind']} {info['num_records']:,} records, {info['num_tokens']:,} tokens "
          f"in {info['num_shards']} shard(s) ({info['dtype']}){note}")
    if result.bad_records:
        print(f"  {len(result.bad_records)} bad record(s) skipped, e.g.:")
        for where in result.bad_records[:5]:
            print(f"    {where}")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Stage 3: tokenize prepared data into memory-mapped token shards (docs/data.md).",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--kind", choices=KINDS, help="what the input holds (not needed with --all)")
    parser.add_argument("--input", nargs="+", help="jsonl/json/txt files or directories")
    parser.add_argument("--out_dir", help="shard directory to write, e.g. out/tokens/pretrain/train")
    parser.add_argument("--all", action="store_true", help="tokenize every {kind}_{split}.jsonl in --data_dir")
    parser.add_argument("--data_dir", default="out/data", help="stage 2 output, used with --all")
    parser.add_argument("--out_root", default="out/tokens", help="output root used with --all")
    parser.add_argument("--tokenizer", default="out/tokenizer", help="stage 1 tokenizer directory")
    parser.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    parser.add_argument("--records_per_shard", type=int, default=100_000)
    parser.add_argument("--chunk_records", type=int, default=256, help="records per work item sent to a worker")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    bars_only_on_a_terminal()
    options = dict(workers=args.workers or None, records_per_shard=args.records_per_shard,
                   chunk_records=args.chunk_records, strict=args.strict, progress=not args.no_progress)
    # `kill -2`, `kill` or Ctrl-C ends the run with its finished shards kept, the pool ended, not left to break
    try:
        with signals_interrupt():
            if args.all:
                results = build_all(args.data_dir, args.tokenizer, args.out_root, **options)
            else:
                if not (args.kind and args.input and args.out_dir):
                    parser.error("give --kind, --input and --out_dir (or --all)")
                results = [build_shards(args.kind, args.input, args.tokenizer, args.out_dir, **options)]
    except DataError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        exit_interrupted("tokenize: interrupted; the finished shards are kept, the same command goes on from them")
    for result in results:
        _report(result)


if __name__ == "__main__":
    run_main(main)
