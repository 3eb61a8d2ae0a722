"""Stage 6's inputs: validation texts and shards, verifiable tasks, held-out prompts, and which tokenizer made
them."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mateconv.data import DataError
from mateconv.data.formats import sft_messages
from mateconv.data.readers import BadLine, SUFFIXES, TEXT_KEYS, iter_records, record_text
from mateconv.data.shards import PretrainEvalTokens, SFTTokens
from mateconv.errors import InputError
from mateconv.logprobs import IGNORE_INDEX, document_windows


class EvalError(InputError, RuntimeError):
    """Bad evaluation input (missing model or data, malformed records); shown as one line."""


def numbered_records(path: Path) -> list[tuple[str, dict]]:
    """("path:line", record) for each record of a file in a format stage 2 reads (.jsonl, a .json array, .txt lines as
    {"text"} records, parquet, gzipped); the first bad line stops the evaluation."""
    if not path.is_file():
        raise EvalError(f"no such file: {path}")
    records = []
    try:
        for source, line, record in iter_records(path):
            where = f"{source}:{line}"
            if isinstance(record, BadLine):
                raise EvalError(f"{where}: {record.error}")
            if not isinstance(record, dict):
                raise EvalError(f"{where}: expected a JSON object")
            records.append((where, record))
    except DataError as error:
        raise EvalError(str(error)) from None
    return records


def read_jsonl(path: Path) -> list[dict]:
    return [record for _, record in numbered_records(path)]


def conversation(record: dict, where: str) -> list[dict]:
    """A record's messages in any SFT shape stage 2 reads (messages, MiniMind or ShareGPT conversations, ...)."""
    try:
        return sft_messages(record)
    except DataError as error:
        raise EvalError(f"{where}: {error}") from None


def document_text(record: dict, where: str) -> str:
    """A document record's text as stage 2 takes it for pretraining (`record_text`)."""
    try:
        return record_text(record)
    except DataError as error:
        raise EvalError(f"{where}: {error}") from None


def val_records(path: Path) -> list[str | list[dict]]:
    """A validation file's documents: a document record's text (a text, content or paragraphs field, as stage 2 reads
    pretraining text), a conversation's messages."""
    records = [document_text(record, where) if any(key in record for key in TEXT_KEYS) else conversation(record, where)
               for where, record in numbered_records(path)]
    if not records:
        raise EvalError(f"{path}: no records to score for perplexity (the file is empty)")
    return records


class TextRecords(Dataset):
    """A JSONL of {"text"} records or conversations; loss on every token after a record's first. A record longer than
    `seq_len` takes several rows, each after the first beginning with the last token of the one before (as bits per
    byte cuts documents), so that it is scored whole."""

    def __init__(self, path: Path, tokenizer, seq_len: int):
        self.items = []
        for record in val_records(path):
            if isinstance(record, str):
                ids = tokenizer.encode(record, add_special_tokens=False) + [tokenizer.eos_token_id]
            else:
                ids = list(tokenizer.apply_chat_template(record, tokenize=True, return_dict=False))
            self.items += [torch.tensor(window) for window, _ in document_windows(ids[1:], ids[:1], seq_len)]
        if not self.items:
            raise EvalError(f"{path}: no usable records")
        self.seq_len, self.pad_id = seq_len, tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.items[index]
        padded = torch.full((self.seq_len,), self.pad_id)
        padded[: len(ids)] = ids
        labels = torch.full((self.seq_len,), IGNORE_INDEX)
        labels[: len(ids)] = ids
        attention = (torch.arange(self.seq_len) < len(ids)).long()
        return {"input_ids": padded, "labels": labels, "attention_mask": attention}


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    """Each record's text as stage 2 takes it for pretraining (a text field, or all the turns of a conversation; see
    `mateconv.data.readers.record_text`), from stage 2's pretrain_val.jsonl or any file it reads; the first `limit`."""
    texts = [document_text(record, where) for where, record in numbered_records(path)]
    if not texts:
        raise EvalError(f"{path}: no documents to score for bits per byte (the file is empty)")
    return texts[:limit]


def read_tasks(path: Path, limit: int | None = None) -> list[dict]:
    """The verifiable prompts of a JSONL file (stage 2's tasks_val.jsonl), the first `limit` of them."""
    records = numbered_records(path)
    if not records:
        raise EvalError(f"{path}: no task records (the file is empty)")
    for where, record in records:
        if not isinstance(record.get("messages"), list) or "answer" not in record:
            raise EvalError(f"{where}: a task record needs 'messages' and 'answer' (stage 2's tasks_val.jsonl)")
    return [record for _, record in records[:limit]]


def read_prompts(path: Path, limit: int | None = None) -> list[list[dict]]:
    """Held-out conversations (stage 2's sft_val.jsonl, or any SFT shape it reads) cut before their first assistant
    turn: the prompts."""
    prompts = []
    for where, record in numbered_records(path):
        messages = conversation(record, where)
        turn = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
        if turn and messages[turn - 1].get("role") == "user":
            prompts.append(messages[:turn])
    if not prompts:
        raise EvalError(f"{path}: no conversation with a user turn before the assistant's")
    return prompts[:limit]


def prompt_text(messages: list[dict]) -> str:
    """The last user message: how a prompt is named in the summaries."""
    return messages[-1]["content"]


def val_dataset(source: Path, tokenizer, seq_len: int) -> Dataset:
    """A token shard directory from stage 3 (pretrain or sft) or a JSONL file of texts / conversations."""
    if source.is_dir():
        index = source / "index.json"
        if not index.is_file():
            raise EvalError(f"{source} is not a token shard directory (no index.json)")
        kind = json.loads(index.read_text()).get("kind")
        readers = {"pretrain": PretrainEvalTokens, "sft": SFTTokens}
        if kind not in readers:
            raise EvalError(f"{source}: perplexity needs pretrain or sft shards, found kind {kind!r}")
        try:
            return readers[kind](source, seq_len)
        except DataError as error:
            raise EvalError(str(error)) from None
    if source.name.endswith(SUFFIXES):
        return TextRecords(source, tokenizer, seq_len)
    raise EvalError(f"validation data must be a token shard directory or a file of records ({', '.join(SUFFIXES)}): "
                    f"{source}")
