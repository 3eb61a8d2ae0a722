"""What stage 6 measures on one model beyond perplexity: verifiable-task accuracy, greedy replies, expert balance."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mateconv.chat import context_length, prompt_ids
from mateconv.evaluate.data import EvalError
from mateconv.tasks import check_answer
from model.generation import generate_tokens


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
