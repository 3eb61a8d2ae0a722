"""Token shards: their layout on disk, and torch Datasets that read them back (stage 3 writes them:
mateconv/data/tokenizing.py).

A shard directory (`out/tokens/<kind>/<split>/`) holds `index.json` and, per finished shard `part-NNNNN`:
- `part-NNNNN.tokens.bin`  flat token ids (uint16 when the vocab fits, else uint32)
- `part-NNNNN.mask.bin`    sft only: uint8 loss mask, 1 on assistant content + closing <|im_end|>
- `part-NNNNN.offsets.bin` int64 record boundaries into the tokens (pretrain and sft: records + 1 entries;
                           dpo: 3 * records + 1 entries, each record being prompt, chosen, rejected in that order)
Pretraining documents are packed as `doc tokens + [eos]` into one stream; readers cut it into rows that begin at
document starts (PretrainTokens). A document ends where its record ends, not at every EOS in it: MiniMind's
pretraining text holds whole chats with their literal <|im_end|> turn ends, and each stays one document.
index.json lists only finished shards, and says `"complete": true` once all are: readers refuse a directory that is not.
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from mateconv.data import DataError
from mateconv.logprobs import IGNORE_INDEX

KINDS = ("pretrain", "sft", "dpo")
FORMAT_VERSION = 2  # 2: pretraining shards record their document boundaries (offsets)


def _index(directory: str | Path) -> dict:
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise DataError(f"{directory} is not a token shard directory (no index.json); run 3.dataset.py first")
    index = json.loads(path.read_text())
    if not index.get("complete"):
        raise DataError(f"{directory}: tokenization did not finish (index.json has complete=false); re-run 3.dataset.py")
    return index


def shard_info(directory: str | Path) -> dict:
    """index.json plus totals: num_records, num_tokens, num_shards, bytes on disk."""
    directory = Path(directory)
    index = _index(directory)
    files = [p for p in directory.iterdir() if p.name.startswith("part-") and p.suffix == ".bin"]
    return {**index, "num_records": sum(s["num_records"] for s in index["shards"]),
            "num_tokens": sum(s["num_tokens"] for s in index["shards"]), "num_shards": len(index["shards"]),
            "bytes": sum(p.stat().st_size for p in files)}


def tokenizer_model(tokenizer_json: str) -> dict:
    """The vocabulary and merges of a serialized fast tokenizer, plus its added tokens (not the model section's other
    settings: transformers loads a BPE's unset `continuing_subword_prefix` as "", the file has null)."""
    serialized = json.loads(tokenizer_json)
    model = serialized["model"]
    return {"type": model.get("type"), "vocab": model.get("vocab"), "merges": model.get("merges"),
            "added": [(t["id"], t["content"]) for t in serialized["added_tokens"]]}


def other_vocabulary(source: Path, tokenizer, stage: str = "evaluate") -> str | None:
    """Why token shards at `source` do not fit `tokenizer`'s model (another tokenizer made them), or None;
    text files are tokenized here, so they always fit. The shards' tokenizer (index.json names its directory) is
    compared with the model's; where that directory is gone, only the vocabulary sizes are."""
    index = source / "index.json"
    if not index.is_file():
        return None
    info = json.loads(index.read_text())
    vocab_size, made_by = info.get("vocab_size"), info.get("tokenizer")
    if vocab_size not in (None, len(tokenizer)):
        return (f"{source} was tokenized with a {vocab_size}-token vocabulary, the model's tokenizer has "
                f"{len(tokenizer)} (another tokenizer)")
    theirs = Path(made_by or "") / "tokenizer.json"
    if not made_by or not theirs.is_file() or not hasattr(tokenizer, "backend_tokenizer"):
        print(f"[{stage}] {source}: the tokenizer that made it ({made_by or 'not recorded'}) cannot be compared "
              "with the model's; only the vocabulary sizes are, and they agree", flush=True)
        return None
    # both serialized by this tokenizers library, so that equal tokenizers compare equal whatever wrote the file
    shards_tokenizer = tokenizer_model(Tokenizer.from_file(str(theirs)).to_str())
    if shards_tokenizer != tokenizer_model(tokenizer.backend_tokenizer.to_str()):
        return (f"{source} was tokenized by {made_by}, whose vocabulary or merges are not the model's "
                "(another tokenizer)")
    return None


class _ShardReader(Dataset):
    """Memory-maps the shards of a directory lazily (after a DataLoader fork, each worker maps its own)."""

    kind = ""

    def __init__(self, directory: str | Path, seq_len: int):
        self.directory = Path(directory)
        self.index = _index(self.directory)
        if self.index["kind"] != self.kind:
            raise DataError(f"{directory} holds {self.index['kind']} shards, not {self.kind}")
        if seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len = seq_len
        self.dtype = np.dtype(self.index["dtype"])
        self.pad_id, self.eos_id = self.index["pad_id"], self.index["eos_id"]
        self.shards = self.index["shards"]
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def _map(self, shard: int, part: str) -> np.ndarray:
        key = (shard, part)
        if key not in self._maps:
            dtype = {"tokens": self.dtype, "mask": np.uint8, "offsets": np.int64}[part]
            path = self.directory / f"{self.shards[shard]['name']}.{part}.bin"
            self._maps[key] = (np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size
                               else np.zeros(0, dtype=dtype))
        return self._maps[key]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}


class DocumentRows(Dataset):
    """Rows of seq_len tokens cut from a stream of `doc tokens + [eos]` documents, each beginning at a document start.

    Row = the token just before its first piece (the previous document's EOS, the one the model sees before a
    document at inference) + pieces filling the other seq_len - 1 positions: no padding, and no token left out.
    Whole documents are placed best-fit (the longest one that still fits, from a window of the next
    `pool_size` documents in stream order), so a short document is rarely split across rows. When none fits the
    room left, a pooled document fills it (one longer than a row if there is one, else the one that leaves the
    shortest rest) and its rest opens the next row (with its own previous token as context). labels == input_ids
    (the model shifts); position_ids restart after each document's last token (its EOS), so a model with
    `document_mask` keeps documents from attending to each other. Subclasses provide `tokens(begin, end)`, `eos_id`
    and `dtype`, then call `plan` with the stream positions where documents end."""

    pool_size = 1024
    keep_short_last_row = False  # training leaves out the tokens of a last row that would not fill up
    eos_id: int
    dtype: np.dtype

    def plan(self, doc_ends: np.ndarray, num_tokens: int, seq_len: int) -> None:
        last = doc_ends[-1] if len(doc_ends) else -1
        if last < num_tokens - 1:  # tokens after the last end (none at all, or a cut stream) form one more document
            doc_ends = np.append(doc_ends, num_tokens - 1)
        self.doc_ends = np.asarray(doc_ends, dtype=np.int64)
        self.piece_starts, self.piece_lengths, self.row_bounds = plan_rows(
            np.diff(self.doc_ends, prepend=-1), seq_len - 1, self.pool_size,
            keep_short_last=self.keep_short_last_row)

    def tokens(self, begin: int, end: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.row_bounds) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        first, last = self.row_bounds[i], self.row_bounds[i + 1]
        start = int(self.piece_starts[first])
        lead = self.tokens(start - 1, start) if start else np.array([self.eos_id], dtype=self.dtype)
        parts = [lead] + [self.tokens(int(s), int(s + n)) for s, n in
                          zip(self.piece_starts[first:last], self.piece_lengths[first:last])]
        ids = np.concatenate(parts).astype(np.int64)
        # a document's positions count from the EOS before it (its context at inference); the row's first token
        # opens the first one
        stream = np.concatenate([[start - 1]] + [np.arange(s, s + n) for s, n in
                                                 zip(self.piece_starts[first:last], self.piece_lengths[first:last])])
        found = np.minimum(np.searchsorted(self.doc_ends, stream), len(self.doc_ends) - 1)
        index = np.arange(len(ids))
        positions = index - np.maximum.accumulate(np.where((self.doc_ends[found] == stream) | (index == 0), index, 0))
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(ids.copy()),
                "position_ids": torch.from_numpy(positions)}


class PretrainTokens(_ShardReader, DocumentRows):
    """The pretraining shards as DocumentRows."""

    kind = "pretrain"

    def __init__(self, directory: str | Path, seq_len: int):
        super().__init__(directory, seq_len)
        if self.index.get("format_version", 1) < 2:
            raise DataError(f"{directory}: pretraining shards of an older MateConv, without document boundaries; run "
                            "3.dataset.py again (it rebuilds them)")
        self.starts = np.cumsum([0] + [s["num_tokens"] for s in self.shards]).tolist()
        self.plan(np.concatenate([self._map(shard, "offsets")[1:] - 1 + self.starts[shard]
                                  for shard in range(len(self.shards))] + [np.zeros(0, dtype=np.int64)]),
                  self.starts[-1], seq_len)

    def tokens(self, begin: int, end: int) -> np.ndarray:
        """Global token positions [begin, end) of the stream, read across shard boundaries."""
        pieces = []
        while begin < end:
            shard = bisect.bisect_right(self.starts, begin) - 1
            stop = min(end, self.starts[shard + 1])
            pieces.append(self._map(shard, "tokens")[begin - self.starts[shard]: stop - self.starts[shard]])
            begin = stop
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


class PretrainEvalTokens(PretrainTokens):
    """PretrainTokens for evaluation: the last row is kept even when the stream runs out before it fills up, and padded
    (pad id, label -100, position 0, token_mask 0: a MoE model's expert load leaves it out), so every token of the
    stream is scored once whatever seq_len, and models of different contexts score the same tokens."""

    keep_short_last_row = True

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = super().__getitem__(i)
        row["token_mask"] = torch.ones_like(row["input_ids"])
        padding = self.seq_len - len(row["input_ids"])
        fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "position_ids": 0, "token_mask": 0}
        return {key: torch.cat([value, torch.full((padding,), fill[key], dtype=value.dtype)])
                for key, value in row.items()}


def plan_rows(doc_lengths: np.ndarray, width: int, pool_size: int, split: bool = True,
              keep_short_last: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best-fit packing of consecutive documents (stream lengths, EOS included) into rows of `width` tokens.

    -> (piece start positions, piece lengths, row bounds into the pieces: row r is pieces[bounds[r]:bounds[r+1]]).
    Every token of the stream is in exactly one piece, except those of a last row that would not fill up (kept short
    with `keep_short_last`).
    With split=False (documents of at most `width` tokens, e.g. SFT conversations) no document is cut: a row that
    none of the pooled documents fits is left short, and the last row is kept."""
    doc_starts = np.cumsum(doc_lengths) - doc_lengths
    pool: list[tuple[int, int]] = []  # (length, document), sorted
    upcoming = 0
    remainder: tuple[int, int] | None = None  # (start, length) of a document cut at the end of the previous row
    piece_starts, piece_lengths, bounds = [], [], [0]

    def refill() -> None:
        nonlocal upcoming
        while len(pool) < pool_size and upcoming < len(doc_lengths):
            bisect.insort(pool, (int(doc_lengths[upcoming]), upcoming))
            upcoming += 1

    def place(start: int, length: int) -> None:
        piece_starts.append(start)
        piece_lengths.append(length)

    refill()
    while pool or remainder:
        room = width
        if remainder:
            start, length = remainder
            place(start, min(length, room))
            remainder = (start + room, length - room) if length > room else None
            room -= piece_lengths[-1]
        while room and pool:
            fits = bisect.bisect_right(pool, (room, len(doc_lengths))) - 1
            if fits < 0 and not split:
                break
            # none fits: cut one that cannot be whole anyway, else the one whose cut-off rest is shortest
            length, doc = pool.pop(fits if fits >= 0 else -1 if pool[-1][0] > width else fits + 1)
            start = int(doc_starts[doc])
            place(start, min(length, room))
            if length > room:
                remainder = (start + room, length - room)
            room -= piece_lengths[-1]
            refill()
        # the data ran out mid-row (splitting fills every row while documents are left)
        if room and split and not keep_short_last:
            del piece_starts[bounds[-1]:], piece_lengths[bounds[-1]:]
            break
        bounds.append(len(piece_starts))
    return (np.asarray(piece_starts, dtype=np.int64), np.asarray(piece_lengths, dtype=np.int64),
            np.asarray(bounds, dtype=np.int64))


class _RecordReader(_ShardReader):
    spans_per_record = 1

    def __init__(self, directory: str | Path, seq_len: int):
        super().__init__(directory, seq_len)
        self.starts = np.cumsum([0] + [s["num_records"] for s in self.shards]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        """Record i -> (shard, record within it)."""
        if not 0 <= i < self.starts[-1]:
            raise IndexError(i)
        shard = bisect.bisect_right(self.starts, i) - 1
        return shard, i - self.starts[shard]

    def _pad(self, ids: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
        ids, labels = ids[: self.seq_len], labels[: self.seq_len]
        n = len(ids)
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        padded_labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        input_ids[:n] = torch.from_numpy(ids.astype(np.int64))
        padded_labels[:n] = torch.from_numpy(labels.astype(np.int64))
        return {"input_ids": input_ids, "labels": padded_labels,
                "attention_mask": (torch.arange(self.seq_len) < n).long()}


def _has_labels(mask: np.ndarray, starts: np.ndarray, lengths: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Whether each record (tokens starts[i]:starts[i] + lengths[i] of a shard) has a trained token, summing the mask
    a chunk of records at a time."""
    found = np.zeros(len(starts), dtype=bool)
    for low in range(0, len(starts), chunk):
        begin, length = starts[low:low + chunk], lengths[low:low + chunk]
        base = int(begin[0])
        seen = np.concatenate([[0], np.cumsum(mask[base:int(begin[-1] + length[-1])], dtype=np.int64)])
        found[low:low + chunk] = seen[begin - base + length] > seen[begin - base]
    return found


class SFTTokens(_RecordReader):
    """SFT rows of seq_len tokens: each conversation truncated to seq_len, labels -100 off the assistant tokens, the
    rest of a row padded (pad id, label -100). A conversation with no assistant token in its first seq_len tokens (a
    long prompt) would train nothing, and a batch of them would make the loss NaN: it is left out, and counted in
    `untrained`.

    Unpacked (the default), a row holds one conversation and right padding: plain causal attention is exact for it,
    so the row carries no attention mask (no per-batch mask check in the forward), only a `token_mask` (1 on the
    conversations' tokens, 0 on padding) that keeps padding out of a MoE model's expert load and balance loss.
    With `packing`, conversations are placed whole and best-fit into rows (as TRL's packing; none is cut) and
    position_ids restart at each one, so a model with `document_mask` keeps them from attending to each other: fewer
    padded positions per step, the same loss per conversation. Row r holds records
    row_records[row_bounds[r]:row_bounds[r + 1]]."""

    kind = "sft"
    pool_size = 1024

    def __init__(self, directory: str | Path, seq_len: int, packing: bool = False):
        super().__init__(directory, seq_len)
        self.packing = packing
        self.record_starts, self.record_lengths, trained = [], [], [np.zeros(0, dtype=bool)]
        for shard in range(len(self.shards)):
            offsets = self._map(shard, "offsets").astype(np.int64)
            self.record_starts.append(offsets[:-1])
            self.record_lengths.append(np.minimum(np.diff(offsets), seq_len))
            trained.append(_has_labels(self._map(shard, "mask"), offsets[:-1], self.record_lengths[-1]))
        self.records = np.flatnonzero(np.concatenate(trained))  # the conversations that train, in order
        self.untrained = self.starts[-1] - len(self.records)
        lengths = np.concatenate(self.record_lengths + [np.zeros(0, dtype=np.int64)])[self.records]
        self.num_records, self.num_real_tokens = len(lengths), int(lengths.sum())
        if packing:
            # the planner sees the records as one stream, where a piece's start names its record
            starts, _, self.row_bounds = plan_rows(lengths, seq_len, self.pool_size, split=False)
            self.row_records = self.records[np.searchsorted(np.cumsum(lengths) - lengths, starts)]

    def __len__(self) -> int:
        return len(self.row_bounds) - 1 if self.packing else len(self.records)

    def _record(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        shard, j = self._locate(i)
        begin = int(self.record_starts[shard][j])
        end = begin + int(self.record_lengths[shard][j])
        ids = self._map(shard, "tokens")[begin:end].astype(np.int64)
        mask = self._map(shard, "mask")[begin:end].astype(bool)
        return ids, np.where(mask, ids, IGNORE_INDEX)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if not self.packing:
            parts = [self._record(int(self.records[i]))]
        else:
            parts = [self._record(int(r)) for r in self.row_records[self.row_bounds[i]:self.row_bounds[i + 1]]]
        ids = np.concatenate([p[0] for p in parts])
        row = self._pad(ids, np.concatenate([p[1] for p in parts]))
        # right padding, and packed conversations are told apart by their positions: no attention mask is needed
        row["token_mask"] = row.pop("attention_mask")
        if self.packing:
            # positions restart at each conversation; the padding counts as one more (no real token attends to it)
            lengths = [len(p[0]) for p in parts] + [self.seq_len - len(ids)]
            row["position_ids"] = torch.cat([torch.arange(n) for n in lengths])
        return row


class DPOTokens(_RecordReader):
    """prompt + chosen and prompt + rejected, each truncated to seq_len and right-padded; labels -100 on the prompt.

    When a pair is too long the prompt is cut from the left (keeping at least half of seq_len) and then the
    responses are cut at seq_len, so both sides always share the same prompt tokens. `cut` counts those pairs; of
    them, the `same` whose chosen and rejected are the same tokens once cut (no preference: no gradient, a loss of
    log 2 and an accuracy of 0 in every mean) are left out.
    """

    kind = "dpo"

    def __init__(self, directory: str | Path, seq_len: int):
        super().__init__(directory, seq_len)
        self.cut, same = 0, []
        for shard in range(len(self.shards)):
            lengths = np.diff(self._map(shard, "offsets").astype(np.int64)).reshape(-1, 3)
            for j in np.flatnonzero(lengths[:, 0] + lengths[:, 1:].max(axis=1) > self.seq_len):
                prompt, chosen, rejected = self._pair(shard, int(j))
                room = self.seq_len - self._prompt_kept(len(prompt), len(chosen), len(rejected))
                self.cut += 1
                if np.array_equal(chosen[:room], rejected[:room]):
                    same.append(self.starts[shard] + int(j))
        self.same = len(same)
        self.records = np.setdiff1d(np.arange(self.starts[-1]), same)  # the pairs kept, in order

    def __len__(self) -> int:
        return len(self.records)

    def _pair(self, shard: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        offsets, tokens = self._map(shard, "offsets"), self._map(shard, "tokens")
        return tuple(tokens[int(offsets[3 * j + k]): int(offsets[3 * j + k + 1])].astype(np.int64) for k in range(3))

    def _prompt_kept(self, prompt: int, chosen: int, rejected: int) -> int:
        return min(prompt, max(self.seq_len - max(chosen, rejected), self.seq_len // 2))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self.records):
            raise IndexError(i)
        prompt, chosen, rejected = self._pair(*self._locate(int(self.records[i])))
        keep = self._prompt_kept(len(prompt), len(chosen), len(rejected))
        prompt = prompt[len(prompt) - keep:]
        item = {}
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids = np.concatenate([prompt, response])
            labels = np.concatenate([np.full(len(prompt), IGNORE_INDEX), response])
            for key, value in self._pad(ids, labels).items():
                item[f"{side}_{key}"] = value
        return item

