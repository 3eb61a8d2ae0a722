"""Stage 6: evaluate saved checkpoints side by side.

For each model directory: validation perplexity (token shards or a JSONL of texts/conversations), bits per byte on
whole held-out documents (tokenizer-independent), accuracy on the verifiable prompts of the embedded data set (greedy,
chat template), greedy samples on held-out prompts, and for MoE models the per-layer expert load with balance
statistics. With a judge endpoint, pairwise win rates (SFT vs pretrain, DPO vs SFT) on held-out prompts. Writes PNG
plots, summary.md, summary.csv and summary.json.

    python -m mateconv.evaluate --models out/pretrain/final out/sft/final out/dpo/final --out_dir out/eval
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mateconv.chat import (SEED_MODEL_MODES, ChatError, check_seed_shape, context_length, load_model, prompt_ids,
                           resolve_device)
from mateconv.config import is_training_checkpoint, under_root
from mateconv.data import DataError
from mateconv.data.formats import sft_messages
from mateconv.data.readers import SUFFIXES, TEXT_KEYS, BadLine, files_under, iter_records, record_text
from mateconv.data.shards import PretrainEvalTokens, SFTTokens, shard_info
from mateconv.files import OutputDirError, save_figure, writable_dir, write_atomic
from mateconv.lm_eval_tasks import run_lm_eval, unknown_tasks
from mateconv.logprobs import IGNORE_INDEX, BitsPerByte, Perplexity, bits_per_byte, document_windows, perplexity
from mateconv.memory import out_of_memory_figures
from mateconv.prefs.endpoints import Endpoint, PrefsError, resolve_judge
from mateconv.tasks import check_answer
from mateconv.terminal import bars_only_on_a_terminal, run_main, signals_interrupt
from mateconv.train.models import CONSOLIDATED, model_dir
from mateconv.winrate import WinRate, check_endpoint, win_rate
from model.generation import generate_tokens

DEFAULT_VAL = "out/tokens/pretrain/val"
DEFAULT_TASKS = "out/data/tasks_val.jsonl"
DEFAULT_BPB_TEXTS = "out/data/pretrain_val.jsonl"
DEFAULT_HELDOUT = "out/data/sft_val.jsonl"
DEFAULT_COMPARISONS = [("sft", "pretrain"), ("dpo", "sft")]  # (model, baseline) by stage, when both are evaluated
SAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "请用一句话介绍你自己。",
    "What is 12 + 7?",
]


PARTS = "parts"  # under --out_dir: each finished model's results and each judged prompt, reused by a rerun
BPB_STARTS = ("auto", "eos", "bos")


class EvalError(RuntimeError):
    """Bad evaluation input (missing model or data, malformed records); shown as one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during the evaluation; its message says what was kept."""


# ---------------------------------------------------------------- data

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


def tokenizer_model(tokenizer_json: str) -> dict:
    """The vocabulary and merges of a serialized fast tokenizer (its "model" section), plus its added tokens."""
    serialized = json.loads(tokenizer_json)
    return {"model": serialized["model"], "added": [(t["id"], t["content"]) for t in serialized["added_tokens"]]}


def other_vocabulary(source: Path, tokenizer) -> str | None:
    """Why token shards at `source` cannot be scored with `tokenizer`'s model (another tokenizer made them), or None;
    text files are tokenized here, so they always fit. The shards' tokenizer (index.json names its directory) is
    compared with the model's; where that directory is gone, only the vocabulary sizes are."""
    index = source / "index.json"
    if not index.is_file():
        return None
    info = json.loads(index.read_text())
    vocab_size, made_by = info.get("vocab_size"), info.get("tokenizer")
    if vocab_size not in (None, len(tokenizer)):
        return (f"{source} was tokenized with a {vocab_size}-token vocabulary, its tokenizer has {len(tokenizer)} "
                "(another tokenizer)")
    theirs = Path(made_by or "") / "tokenizer.json"
    if not made_by or not theirs.is_file() or not hasattr(tokenizer, "backend_tokenizer"):
        print(f"[evaluate] {source}: the tokenizer that made it ({made_by or 'not recorded'}) cannot be compared "
              "with the model's; only the vocabulary sizes are, and they agree", flush=True)
        return None
    # both serialized by this tokenizers library, so that equal tokenizers compare equal whatever wrote the file
    shards_tokenizer = tokenizer_model(Tokenizer.from_file(str(theirs)).to_str())
    if shards_tokenizer != tokenizer_model(tokenizer.backend_tokenizer.to_str()):
        return (f"{source} was tokenized by {made_by}, whose vocabulary or merges are not the model's "
                "(another tokenizer)")
    return None


# ---------------------------------------------------------------- metrics

def balance_stats(expert_load: list[list[float]]) -> dict[str, list[float] | float]:
    """Per layer: coefficient of variation of the expert loads and the max/min load ratio (inf if an expert idles)."""
    load = torch.tensor(expert_load)
    cv = (load.std(dim=1, unbiased=False) / load.mean(dim=1)).tolist()
    max_min = [float(hi / lo) if lo > 0 else math.inf for hi, lo in zip(load.max(dim=1).values, load.min(dim=1).values)]
    return {"cv": cv, "max_min": max_min, "cv_mean": sum(cv) / len(cv), "max_min_worst": max(max_min)}


def greedy_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 8,
                   desc: str = "generate") -> list[str]:
    """The assistant's greedy reply to each conversation (batched, prompts left-padded)."""
    room = context_length(model) - max_new_tokens
    if room < 1:
        raise EvalError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                        f"{context_length(model)} tokens: lower it")
    prompts = [prompt_ids(tokenizer, messages)[-room:] for messages in conversations]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
    replies = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        chunk = prompts[start: start + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        output = generate_tokens(model, input_ids, max_new_tokens=max_new_tokens, temperature=0.0,
                                 eos_token_id=eos, attention_mask=attention_mask)
        for row in output[:, width:].tolist():
            replies.append(tokenizer.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True))
    return replies


@dataclass
class TaskResult:
    accuracy: float
    n: int
    by_kind: dict[str, float]
    rows: list[dict] = field(default_factory=list)  # id, kind, answer, response, correct


def task_accuracy(model, tokenizer, records: list[dict], max_new_tokens: int = 48, batch_size: int = 8) -> TaskResult:
    """Greedy answers to the verifiable prompts (checked by `read_tasks`), checked by `mateconv.tasks.check_answer`."""
    responses = greedy_replies(model, tokenizer, [r["messages"] for r in records], max_new_tokens, batch_size,
                               desc="tasks")
    rows = [{"id": r.get("id"), "kind": r.get("kind", "?"), "answer": r["answer"], "response": response,
             "correct": bool(check_answer(r, response))} for r, response in zip(records, responses)]
    kinds: dict[str, list[bool]] = {}
    for row in rows:
        kinds.setdefault(row["kind"], []).append(row["correct"])
    by_kind = {kind: sum(hits) / len(hits) for kind, hits in sorted(kinds.items())}
    accuracy = sum(row["correct"] for row in rows) / len(rows) if rows else float("nan")
    return TaskResult(accuracy, len(rows), by_kind, rows)


# ---------------------------------------------------------------- one model, many models

@dataclass
class ModelReport:
    label: str
    path: str
    kind: str  # "dense" or "moe"
    params_m: float
    ppl: Perplexity | None = None
    bpb: BitsPerByte | None = None
    bpb_start: str | None = None  # "bos" or "eos": the token each document followed when scored
    tasks: TaskResult | None = None
    samples: dict[str, str] = field(default_factory=dict)  # prompt -> greedy reply
    judge_replies: list[str] = field(default_factory=list)  # greedy replies to the judged held-out prompts
    win_rates: list[WinRate] = field(default_factory=list)  # this model against its baselines
    balance: dict | None = None
    lm_eval: dict[str, float] = field(default_factory=dict)  # "<task>/<metric>" from lm-evaluation-harness
    error: str | None = None  # why this model was not evaluated (the others still are)

    def row(self) -> dict:
        """One flat row for summary.csv / summary.md."""
        return {
            "model": self.label, "kind": self.kind,
            "params_M": None if math.isnan(self.params_m) else round(self.params_m, 2),
            "val_loss": None if self.ppl is None else round(self.ppl.loss, 4),
            "val_ppl": None if self.ppl is None else round(self.ppl.ppl, 3),
            "val_tokens": None if self.ppl is None else self.ppl.tokens,
            "val_bpb": None if self.bpb is None else round(self.bpb.bpb, 4),
            "task_accuracy": None if self.tasks is None else round(self.tasks.accuracy, 4),
            "tasks_n": None if self.tasks is None else self.tasks.n,
            "load_cv_mean": None if self.balance is None else round(self.balance["cv_mean"], 4),
            "load_max_min": None if self.balance is None else round(self.balance["max_min_worst"], 3),
            **{f"lm_eval:{name}": round(value, 4) for name, value in self.lm_eval.items()},
            **{f"win_rate:{w.baseline}": None if math.isnan(w.win_rate) else round(w.win_rate, 4)
               for w in self.win_rates},
            **({"error": self.error} if self.error else {}),
        }


def ships_own_code(path: Path) -> bool:
    """Whether loading the checkpoint at `path` runs code it ships: an auto_map for a model type transformers does
    not know (MiniMind's converted models; ours are registered when `model` is imported)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise EvalError(f"{path / 'config.json'}: not valid JSON ({error.msg})") from None
    return "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING


def model_labels(paths: list[Path]) -> list[str]:
    """Each checkpoint's label: its last two path parts, the stage and the checkpoint (out/sft/final -> sft/final), and
    more of the path where two would read alike or name their files alike (out/sft/final and runB/sft/final keep their
    first parts, as do x/a_b/final and y/a/b_final)."""
    resolved = [path.resolve() for path in paths]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise EvalError(f"--models names the checkpoint {paths[index]} twice")
    depths = [2] * len(paths)
    while True:
        labels = [Path(*path.parts[-depth:]).as_posix() for path, depth in zip(paths, depths)]
        names = [file_label(label) for label in labels]
        alike = [index for index, name in enumerate(names) if names.count(name) > 1]
        if not alike:
            return labels
        if all(depths[index] >= len(paths[index].parts) for index in alike):  # alike to the first part
            first, second = [paths[index] for index in alike if names[index] == names[alike[0]]][:2]
            raise EvalError(f"--models {first} and {second} would write their results to the same files (named "
                            f"{names[alike[0]]}): give one of them another folder name")
        for index in alike:
            depths[index] += 1


def stage_of(label: str) -> str:
    """sft/final -> sft; runB/sft/final -> sft"""
    parts = label.split("/")
    return parts[-2] if len(parts) > 1 else parts[0]


def comparisons_for(labels: list[str], requested: list[str] | None) -> list[tuple[str, str]]:
    """(model, baseline) label pairs: each requested 'MODEL:BASELINE' (a label or a stage name), by default the
    DEFAULT_COMPARISONS whose both stages are among the models."""
    def find(name: str) -> str | None:
        return next((label for label in labels if name in (label, stage_of(label))), None)

    if requested is None:
        pairs = [(find(model), find(baseline)) for model, baseline in DEFAULT_COMPARISONS]
        return [(model, baseline) for model, baseline in pairs if model and baseline]
    pairs = []
    for item in requested:
        model, _, baseline = item.partition(":")
        found = (find(model), find(baseline))
        if not baseline or None in found or found[0] == found[1]:
            raise EvalError(f"--compare {item!r}: expected MODEL:BASELINE, two different model labels or stages "
                            f"among {', '.join(labels)}")
        pairs.append(found)
    return pairs


def model_kind(config) -> str:
    """"moe" or "dense": MateConv's `use_moe`, else a transformers MoE's expert count (our Qwen2-/Qwen3-MoE exports'
    `num_experts`, Mixtral's `num_local_experts`, DeepSeek's `n_routed_experts`)."""
    if hasattr(config, "use_moe"):
        return "moe" if config.use_moe else "dense"
    experts = (getattr(config, name, None) for name in ("num_experts", "num_local_experts", "n_routed_experts"))
    return "moe" if any(isinstance(count, int) and count > 1 for count in experts) else "dense"


def bpb_start_token(model, tokenizer, choice: str) -> str:
    """'bos' or 'eos': the token each document follows when scored for bits per byte. 'auto' takes the one the model
    was pretrained with: MiniMind puts BOS before each document; MateConv packs each after the previous one's EOS."""
    if choice == "auto":
        choice = "bos" if model.config.model_type == "minimind" else "eos"
    if getattr(tokenizer, f"{choice}_token_id") is None:
        raise EvalError(f"--bpb_start {choice}: the model's tokenizer has no {choice.upper()} token")
    return choice


def evaluate_model(path: Path, label: str, val: Path | None, tasks: list[dict] | None, samples: list[list[dict]],
                   seq_len: int | None, batch_size: int, max_batches: int | None, max_new_tokens: int,
                   device: str = "auto", lm_eval_tasks: list[str] | None = None, tasks_file: Path | None = None,
                   max_tasks: int | None = None, texts: list[str] | None = None,
                   judge_prompts: list[list[dict]] | None = None, trust_remote_code: bool = False,
                   bpb_start: str = "auto") -> ModelReport:
    model, tokenizer = load_model(path, device, trust_remote_code=trust_remote_code)
    report = ModelReport(label, str(path), model_kind(model.config),
                         sum(p.numel() for p in model.parameters()) / 1e6)
    mismatch = val is not None and other_vocabulary(val, tokenizer)
    if mismatch:  # e.g. MiniMind's model beside ours: its val_bpb still compares
        print(f"[evaluate] {report.label}: {mismatch}; no perplexity for it", flush=True)
    elif val is not None:
        length = min(seq_len or context_length(model), context_length(model))
        try:
            report.ppl = perplexity(model, val_dataset(val, tokenizer, length), batch_size, max_batches)
        except ValueError as error:
            raise EvalError(f"{val}: {error}") from None
        if report.ppl.expert_load is not None:
            report.balance = balance_stats(report.ppl.expert_load)
    if texts:
        report.bpb_start = bpb_start_token(model, tokenizer, bpb_start)
        report.bpb = bits_per_byte(model, tokenizer, texts,
                                   min(seq_len or context_length(model), context_length(model)), batch_size,
                                   [getattr(tokenizer, f"{report.bpb_start}_token_id")])
    if tasks:
        report.tasks = task_accuracy(model, tokenizer, tasks, max_new_tokens, batch_size)
    replies = greedy_replies(model, tokenizer, samples, max_new_tokens, batch_size, desc="samples")
    report.samples = dict(zip(map(prompt_text, samples), replies))
    if judge_prompts:
        report.judge_replies = greedy_replies(model, tokenizer, judge_prompts, max_new_tokens, batch_size,
                                              desc="judge prompts")
    if lm_eval_tasks:
        report.lm_eval = run_lm_eval(model_dir(path), lm_eval_tasks, tasks_file, max_tasks, max_new_tokens,
                                     str(model.device))
    return report


# ---------------------------------------------------------------- outputs

def plot_summary(reports: list[ModelReport], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    labels = [r.label for r in reports]
    metrics = [("validation perplexity", [r.ppl.ppl if r.ppl else math.nan for r in reports]),
               ("held-out bits per byte", [r.bpb.bpb if r.bpb else math.nan for r in reports]),
               ("task accuracy", [r.tasks.accuracy if r.tasks else math.nan for r in reports])]
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for ax, (title, values) in zip(axes, metrics):
        colors = ["tab:orange" if r.kind == "moe" else "tab:blue" for r in reports]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), labels, rotation=20, ha="right")
        ax.set_title(title)
        for x, value in enumerate(values):
            if not math.isnan(value):
                ax.annotate(f"{value:.3g}", (x, value), ha="center", va="bottom", fontsize=8)
    figure.suptitle("blue = dense FFN, orange = MoE")
    save_figure(figure, out_dir / "metrics.png")
    plt.close(figure)
    written.append(out_dir / "metrics.png")

    for report in reports:
        if report.ppl is None or report.ppl.expert_load is None:
            continue
        load = torch.tensor(report.ppl.expert_load)
        figure, ax = plt.subplots(figsize=(1.2 + 0.6 * load.shape[1], 1.0 + 0.45 * load.shape[0]))
        image = ax.imshow(load, cmap="viridis", aspect="auto")
        for (layer, expert), value in zip(torch.cartesian_prod(torch.arange(load.shape[0]), torch.arange(load.shape[1])).tolist(),
                                          load.flatten().tolist()):
            ax.text(expert, layer, f"{value:.2f}", ha="center", va="center", color="w", fontsize=7)
        ax.set_xlabel("routed expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{report.label}: token share per expert (CV {report.balance['cv_mean']:.3f})")
        figure.colorbar(image, ax=ax)
        path = out_dir / f"expert_load_{file_label(report.label)}.png"
        save_figure(figure, path)
        plt.close(figure)
        written.append(path)
    return written


def columns(rows: list[dict]) -> list[str]:
    """Every key of the rows, in first-seen order (models differ in their win-rate columns)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def markdown_table(rows: list[dict]) -> str:
    header = columns(rows)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(k) is None else str(row[k]).replace("|", "\\|").replace("\n", " ")
                                       for k in header) + " |")
    return "\n".join(lines)


def win_rate_line(result: WinRate) -> str:
    """The progress line of a win rate, its figures as summary.json holds them (null where no prompt was judged)."""
    return f"[evaluate] win rate {result.model} vs {result.baseline}: {json.dumps(strict_json(result.as_dict()))}"


def strict_json(value):
    """`value` with NaN and infinities as None, so that summary.json is JSON any parser reads (JavaScript's, jq's)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [strict_json(item) for item in value]
    return value


def write_summary(reports: list[ModelReport], out_dir: Path, not_evaluated: list[str] | None = None) -> None:
    """summary.csv, summary.json, summary.md and each model's task answers; `not_evaluated`: the models a stopped run
    did not reach, named in summary.json and summary.md."""
    rows = [report.row() for report in reports]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(rows))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "summary.csv", buffer.getvalue())

    summary = {"models": [{**report.row(), "path": report.path,
                           "accuracy_by_kind": report.tasks.by_kind if report.tasks else None,
                           "expert_load": report.ppl.expert_load if report.ppl else None,
                           "bpb": None if report.bpb is None else {"tokens": report.bpb.tokens,
                                                                   "bytes": report.bpb.bytes,
                                                                   "documents": report.bpb.documents,
                                                                   "start": report.bpb_start},
                           "balance": report.balance, "samples": report.samples}
                          for report in reports],
               "win_rates": [w.as_dict() for report in reports for w in report.win_rates],
               **({"not_evaluated": not_evaluated} if not_evaluated else {})}
    write_atomic(out_dir / "summary.json", json.dumps(strict_json(summary), indent=2, ensure_ascii=False,
                                                      allow_nan=False) + "\n")

    parts = ["# MateConv evaluation", "", markdown_table(rows), "", "![metrics](metrics.png)", ""]
    if not_evaluated:
        parts[2:2] = [f"Stopped before it evaluated {', '.join(not_evaluated)}.", ""]
    for report in reports:
        if report.balance is not None:
            name = f"expert_load_{file_label(report.label)}.png"
            cv = ", ".join(f"{v:.3f}" for v in report.balance["cv"])
            parts += [f"## Expert load: {report.label}", "", f"per-layer CV: {cv}", "", f"![{name}]({name})", ""]
    wins = [w.as_dict() for report in reports for w in report.win_rates]
    if wins:
        parts += [f"## Win rates (judge: {wins[0]['judge']}; ties count half, failed requests are not judged)", "",
                  markdown_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in w.items()
                                   if k not in ("judge", "failures")} for w in wins]), ""]
    prompts = list(dict.fromkeys(p for r in reports for p in r.samples))
    parts += ["## Samples (greedy)", "",
              markdown_table([{"prompt": p, **{r.label: r.samples.get(p) for r in reports}} for p in prompts]), ""]
    if any(r.tasks for r in reports):
        parts += ["## Task accuracy by kind", ""]
        kinds = sorted({k for r in reports if r.tasks for k in r.tasks.by_kind})
        parts += [markdown_table([{"kind": k, **{r.label: (round(r.tasks.by_kind[k], 3) if r.tasks and k in
                                                          r.tasks.by_kind else None) for r in reports}}
                                  for k in kinds]), ""]
    write_atomic(out_dir / "summary.md", "\n".join(parts))
    for report in reports:
        if report.tasks:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in report.tasks.rows)
            write_atomic(out_dir / f"tasks_{file_label(report.label)}.jsonl", lines)


def file_label(label: str) -> str:
    """A model label as part of a file name (sft/final -> sft_final)."""
    return label.replace("/", "_")


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


def is_model(path: str | Path) -> bool:
    """Whether `path` holds something to evaluate: a save_pretrained directory or a training checkpoint."""
    return (Path(path) / "config.json").is_file() or is_training_checkpoint(path)


def evaluate(models: list[str | Path], out_dir: str | Path, val: str | Path | None = DEFAULT_VAL,
             tasks: str | Path | None = DEFAULT_TASKS, prompts: list[str] | None = None, seq_len: int | None = None,
             batch_size: int = 8, max_batches: int | None = 50, max_tasks: int | None = 200,
             max_new_tokens: int = 48, device: str = "auto", lm_eval_tasks: list[str] | None = None,
             bpb_texts: str | Path | None = None, max_bpb_docs: int | None = 200, heldout: str | Path | None = None,
             n_samples: int = 4, judge: Endpoint | None = None, judge_prompts: int = 50,
             compare: list[str] | None = None, judge_retries: int = 2, judge_concurrency: int = 8,
             seed: int = 0, trust_remote_code: bool = False, bpb_start: str = "auto") -> list[ModelReport]:
    """Evaluates every model and writes the plots and summaries into `out_dir`. Returns the reports.

    Samples answer `prompts`, else the first `n_samples` conversations of `heldout`, else SAMPLE_PROMPTS. With a
    `judge` endpoint and `heldout`, each (model, baseline) of `compare` is judged on `judge_prompts` prompts.

    Each model's results and each judged prompt are kept under `out_dir`/parts as they finish; a rerun with the same
    checkpoints, data files and settings reuses them. However the run ends (Ctrl-C included), the summaries hold the
    models finished so far."""
    if not models:
        raise EvalError("no models to evaluate")
    if seq_len is not None and seq_len < 2:  # a row needs a token to predict from and one to score
        raise EvalError(f"--seq_len must be at least 2, got {seq_len}")
    counts = [("--batch_size", batch_size, 1, ""), ("--max_new_tokens", max_new_tokens, 1, ""),
              ("--n_samples", n_samples, 0, ""), ("--judge_prompts", judge_prompts, 1, ""),
              ("--judge_retries", judge_retries, 0, ""), ("--judge_concurrency", judge_concurrency, 1, ""),
              *((flag, limit, 1, " (0 = all)") for flag, limit in
                (("--max_batches", max_batches), ("--max_tasks", max_tasks), ("--max_bpb_docs", max_bpb_docs))
                if limit is not None)]
    for flag, value, least, note in counts:
        if value < least:  # a negative limit would silently drop the last items ([:-1])
            raise EvalError(f"{flag} must be at least {least}{note}, got {value}")
    paths = [Path(m) for m in models]
    for path in paths:
        if not is_model(path):
            raise EvalError(f"no model at {path} (expected a save_pretrained directory or a training checkpoint)")
        # a training checkpoint is loaded as its consolidated model (mateconv.train.models.model_dir)
        if not is_training_checkpoint(path) and not trust_remote_code and ships_own_code(path):
            raise EvalError(f"{path} ships its own model code (auto_map in config.json); pass --trust_remote_code "
                            "to run it")
    resolve_device(device)  # a device that is not there fails every model the same way: said once, here
    unknown = unknown_tasks(lm_eval_tasks) if lm_eval_tasks else []
    if unknown:
        raise EvalError(f"--lm_eval_tasks: lm-eval has no task {', '.join(unknown)} ('lm-eval ls tasks' lists them)")
    val_path = Path(val) if val else None
    if val_path is not None and not val_path.exists():
        raise EvalError(f"validation data not found: {val_path}")
    if val_path is not None and val_path.is_file():
        val_records(val_path)  # a broken or empty file stops the run before any model is loaded
    task_records = read_tasks(Path(tasks), max_tasks) if tasks else None
    texts = read_texts(Path(bpb_texts), max_bpb_docs) if bpb_texts else None
    held_out = read_prompts(Path(heldout)) if heldout else None
    if prompts is not None:
        samples = [[{"role": "user", "content": p}] for p in prompts]
    else:
        samples = held_out[:n_samples] if held_out else [[{"role": "user", "content": p}] for p in SAMPLE_PROMPTS]
    if compare and judge is None:
        raise EvalError("--compare needs a judge endpoint: --judge_base_url URL or $OPENAI_BASE_URL")
    labels = model_labels(paths)
    comparisons = comparisons_for(labels, compare) if judge else []
    if comparisons and not held_out:
        raise EvalError("win rates need held-out prompts: pass --heldout (stage 2's sft_val.jsonl)")
    if comparisons:
        try:
            check_endpoint(judge)
        except PrefsError as error:
            raise EvalError(str(error)) from None
        print(f"[evaluate] win rates of {', '.join(f'{m} vs {b}' for m, b in comparisons)} on "
              f"{min(judge_prompts, len(held_out))} held-out prompts, {judge.describe()}", flush=True)
    judged = held_out[:judge_prompts] if comparisons else None
    try:
        out = writable_dir(out_dir, "--out_dir")
        parts = writable_dir(out / PARTS, "--out_dir")
    except OutputDirError as error:
        raise EvalError(str(error)) from None
    # what a model's results depend on besides its checkpoint: a change to any recomputes them
    inputs = [[file_stats(Path(data) if data else None) for data in (val_path, tasks, bpb_texts, heldout)],
              samples, seq_len, batch_size, max_batches, max_tasks, max_new_tokens, device, lm_eval_tasks,
              max_bpb_docs, bpb_start, len(judged or []), trust_remote_code]
    reports, finished_rates = [], 0
    try:
        for path, label in zip(paths, labels):
            kept_at, key = parts / f"model_{file_label(label)}.json", inputs_key(file_stats(path), inputs)
            report = kept_report(kept_at, key)
            if report:
                print(f"[evaluate] {path}: reused the results an earlier run kept for the same checkpoint, data and "
                      f"settings ({kept_at})", flush=True)
            else:
                print(f"[evaluate] {path}", flush=True)
                try:
                    report = evaluate_model(path, label, val_path, task_records, samples, seq_len, batch_size,
                                            max_batches, max_new_tokens, device, lm_eval_tasks,
                                            Path(tasks) if tasks else None, max_tasks, texts, judged,
                                            trust_remote_code, bpb_start)
                    keep_report(kept_at, key, report)
                except (EvalError, ChatError) as error:  # this model's own problem: the others are still evaluated
                    report = ModelReport(label, str(path), "failed", math.nan, error=str(error))
            reports.append(report)
            print(f"[evaluate] {json.dumps(report.row())}", flush=True)
        failed = {report.label for report in reports if report.error}
        for model, baseline in comparisons:
            if {model, baseline} & failed:
                print(f"[evaluate] no win rate of {model} vs {baseline}: "
                      f"{' and '.join(sorted({model, baseline} & failed))} failed", flush=True)
        comparisons = [pair for pair in comparisons if not set(pair) & failed]
        by_label = {report.label: report for report in reports}
        replies = {report.label: report.judge_replies for report in reports}
        for pair in comparisons:
            result = judged_win_rate(judge, pair, judged, replies, parts, seed, judge_retries, judge_concurrency)
            by_label[result.model].win_rates.append(result)
            finished_rates += 1
            print(win_rate_line(result), flush=True)
    except KeyboardInterrupt:
        rates = f" and {finished_rates} of {len(comparisons)} win rates" if comparisons else ""
        summaries = f", summarized in {out}" if reports else ""
        raise Interrupted(f"interrupted: {len(reports)} of {len(paths)} models{rates} finished{summaries}; {parts} "
                          "keeps every finished model and judged prompt, and the same command goes on from them"
                          ) from None
    finally:  # what is done is summarized, however the run ends
        if reports:
            plot_summary(reports, out)
            write_summary(reports, out, labels[len(reports):])
    return reports


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate saved checkpoints: perplexity, task accuracy, samples, "
                                                 "MoE expert load. Writes plots and summaries to --out_dir.")
    parser.add_argument("--models", nargs="+", required=True, help="save_pretrained directories, e.g. out/sft/final")
    parser.add_argument("--out_dir", default="out/eval")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the model code a checkpoint ships (auto_map for a model type transformers lacks, "
                             "e.g. MiniMind's converted models)")
    data = parser.add_argument_group("data")
    data.add_argument("--val", default=None,
                      help=f"token shard dir or file of texts or conversations (.jsonl, .json, .txt, ...) for "
                           f"perplexity (default {DEFAULT_VAL} if it exists; 'none' skips; a model whose tokenizer is "
                           "not the shards' gets none)")
    data.add_argument("--tasks", default=None,
                      help=f"verifiable tasks .jsonl (default {DEFAULT_TASKS} if it exists; 'none' skips)")
    data.add_argument("--bpb_texts", default=None,
                      help=f"held-out documents for bits per byte, any file stage 2 reads, each record's text as "
                           f"pretraining takes it (default {DEFAULT_BPB_TEXTS} if it exists; 'none' skips)")
    data.add_argument("--heldout", default=None,
                      help=f"held-out conversations (any SFT shape and file stage 2 reads) whose prompts are sampled "
                           f"and judged (default {DEFAULT_HELDOUT} if it exists; 'none' skips)")
    data.add_argument("--prompts", nargs="*", default=None,
                      help="sample prompts (default: the first --n_samples held-out prompts, else a built-in few)")
    data.add_argument("--n_samples", type=int, default=4)
    limits = parser.add_argument_group("limits")
    limits.add_argument("--seq_len", type=int, default=None, help="sequence length for perplexity (default: model's)")
    limits.add_argument("--batch_size", type=int, default=8)
    limits.add_argument("--max_batches", type=int, default=50, help="0 = all")
    limits.add_argument("--max_tasks", type=int, default=200, help="0 = all")
    limits.add_argument("--max_new_tokens", type=int, default=48)
    limits.add_argument("--max_bpb_docs", type=int, default=200, help="0 = all")
    limits.add_argument("--bpb_start", choices=BPB_STARTS, default="auto",
                        help="the token each bits-per-byte document follows: auto = how the model was pretrained "
                             "(bos for MiniMind's models, which put BOS first; eos for MateConv's, which pack each "
                             "document after the previous one's EOS)")
    judge = parser.add_argument_group("win rates (a model judge at an OpenAI-compatible endpoint)")
    judge.add_argument("--judge_base_url", default=None,
                       help="URL, 'openai' or 'none' (default: $OPENAI_BASE_URL, else OpenAI when --judge_model or "
                            "$OPENAI_API_KEY is given, else no win rates)")
    judge.add_argument("--judge_model", default=None, help="default: gpt-4o-mini")
    judge.add_argument("--judge_prompts", type=int, default=50, help="held-out prompts judged per comparison")
    judge.add_argument("--compare", nargs="*", default=None, metavar="MODEL:BASELINE",
                       help="model labels or stages (default: sft:pretrain dpo:sft, those present)")
    judge.add_argument("--judge_retries", type=int, default=2, help="retries of a failed judge request")
    judge.add_argument("--judge_concurrency", type=int, default=8, help="judge requests in flight")
    judge.add_argument("--seed", type=int, default=0, help="the order in which each pair is shown")
    parser.add_argument("--lm_eval_tasks", nargs="*", default=None,
                        help="lm-evaluation-harness tasks to run on every model: ours (mateconv_tasks_gen, "
                             "mateconv_tasks_mc, on --tasks) or any lm-eval task name; results join the summaries")
    return parser


def is_empty_shards(path: Path) -> bool:
    """Finished token shards without a record: the validation split of a corpus too small to put a document there."""
    return (path / "index.json").is_file() and shard_info(path)["num_records"] == 0


def optional_path(value: str | None, default: str) -> str | None:
    """An explicit path must exist and hold data (checked later); the default is used only when present and not
    empty; 'none' disables."""
    if value is None:
        path = Path(default)
        if path.is_dir() and not is_empty_shards(path) or path.is_file() and path.stat().st_size:
            return default
        print(f"[evaluate] {default} not found or empty; skipping it", flush=True)
        return None
    return None if value.lower() == "none" else value


def judge_endpoint(base_url: str | None, model: str | None) -> Endpoint | None:
    """The judge from the flags and the environment (as stage 7 finds it), None for no win rates."""
    if base_url == "none":
        return None
    if base_url == "generator":
        raise EvalError("--judge_base_url generator: stage 6 has no generator endpoint; give the judge's URL")
    try:
        return resolve_judge(base_url, model, os.environ, generator=None)
    except PrefsError as error:
        raise EvalError(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    bars_only_on_a_terminal()
    try:
        with signals_interrupt():  # the run stops with what is finished kept and summarized
            reports = evaluate(
                args.models, args.out_dir, optional_path(args.val, DEFAULT_VAL),
                optional_path(args.tasks, DEFAULT_TASKS), args.prompts, args.seq_len, args.batch_size,
                args.max_batches or None, args.max_tasks or None, args.max_new_tokens, args.device,
                args.lm_eval_tasks, optional_path(args.bpb_texts, DEFAULT_BPB_TEXTS), args.max_bpb_docs or None, optional_path(args.heldout, DEFAULT_HELDOUT), args.n_samples,
                judge_endpoint(args.judge_base_url, args.judge_model), args.judge_prompts, args.compare,
                args.judge_retries, args.judge_concurrency, args.seed, args.trust_remote_code, args.bpb_start)
    except (EvalError, ChatError, Interrupted) as error:
        raise SystemExit(f"evaluate: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit("evaluate: interrupted before any model was evaluated") from None
    except torch.OutOfMemoryError as error:
        raise SystemExit(f"evaluate: out of GPU memory ({out_of_memory_figures(error)}) at --batch_size "
                         f"{args.batch_size}: lower it, or use --device cpu; the models are not changed") from None
    print(f"[evaluate] wrote {args.out_dir}/summary.md, summary.csv, summary.json and plots", flush=True)
    failed = [f"{report.label}: {report.error}" for report in reports if report.error]
    if failed:
        raise SystemExit(f"evaluate: not evaluated: {'; '.join(failed)} (the summaries hold the other models)")


def seed_test_main(argv: list[str]) -> None:
    """Seed 000's `pretrain_sft_lora.py --mode test [flags]`, the fourth mode of its flags table: this evaluation of
    the final models its runs wrote under --out_dir (pretrain/, sft/, dpo/), into <out_dir>/eval, on the held-out data
    under it. --batch_size, --device and --max_seq_len (the perplexity length) carry over; --dim and --n_layers must be
    each model's; training flags are named as unused."""
    parser = argparse.ArgumentParser(prog="pretrain_sft_lora.py --mode test", description=seed_test_main.__doc__)
    parser.add_argument("--mode", choices=["test"], default="test")
    parser.add_argument("--out_dir", default="out", help="the layout root holding pretrain/, sft/ and dpo/")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max_seq_len", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--n_layers", type=int, default=None)
    args, unused = parser.parse_known_args(argv)
    root = Path(args.out_dir)
    models = [root / stage / "final" for stage in SEED_MODEL_MODES.values()
              if (root / stage / "final" / "config.json").is_file()]
    if not models:
        raise SystemExit(f"pretrain_sft_lora: --mode test found no trained model under {root} (pretrain/final, "
                         "sft/final or dpo/final); train one first, or name the layout root with --out_dir")
    for model in models:
        check_seed_shape(model, args.dim, args.n_layers, "pretrain_sft_lora")
    if unused:
        print(f"[evaluate] --mode test does not use {' '.join(t for t in unused if t.startswith('-'))}", flush=True)
    # the held-out data under the layout root, each skipped (as main skips its defaults) when missing or empty
    data = [(flag, optional_path(None, under_root(default, root)) or "none") for flag, default in
            (("--val", DEFAULT_VAL), ("--tasks", DEFAULT_TASKS), ("--bpb_texts", DEFAULT_BPB_TEXTS),
             ("--heldout", DEFAULT_HELDOUT))]
    length = ["--seq_len", str(args.max_seq_len)] if args.max_seq_len else []
    main(["--models", *map(str, models), "--out_dir", str(root / "eval"), "--batch_size", str(args.batch_size),
          "--device", args.device, *length, *(part for flag, path in data for part in (flag, path))])


if __name__ == "__main__":
    run_main(main)
