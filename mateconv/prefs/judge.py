"""Judging K candidate replies: the model judge's rubric and its strictly validated JSON answer (candidates shown in
a seeded random order, mapped back), the rule judge (the record's known answer), and the choice of the pair."""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from mateconv.tasks import check_answer

RUBRIC = """You grade candidate replies written by an AI assistant.
You are shown a conversation and several candidate replies to its last user message, each marked with an id.
Rate every candidate on its own merits from 1 (wrong, useless or harmful) to 10 (correct, complete, clear and
helpful): correctness first, then helpfulness, then clarity. Length is no merit in itself, and the order in which
the candidates appear means nothing.
Answer with one JSON object and nothing else, in exactly this shape, with one entry per candidate:
{"scores": [{"id": "<candidate id>", "score": <integer from 1 to 10>, "reason": "<one short sentence>"}]}"""

RULE_SCORES = {True: 10.0, False: 1.0}  # the rule judge's score for a correct / an incorrect reply


class JudgeMalformed(ValueError):
    """The judge's answer is not the JSON the rubric asks for."""


class _Score(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: StrictStr | StrictInt
    score: Annotated[float, Field(ge=1, le=10)]
    reason: StrictStr = ""


class _Answer(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    scores: list[_Score]


def shuffled_order(k: int, seed: int) -> list[int]:
    """The order in which the judge sees the K candidates: order[j] is the candidate shown at position j."""
    order = list(range(k))
    random.Random(seed).shuffle(order)
    return order


def judge_messages(prompt: list[dict], candidates: list[str], order: list[int]) -> list[dict]:
    """The judge's request: the rubric, the conversation, and the candidates in `order` labelled 1..K."""
    conversation = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in prompt)
    shown = "\n\n".join(f'<reply id="{position + 1}">\n{candidates[index]}\n</reply>'
                        for position, index in enumerate(order))
    user = f"## Conversation\n\n{conversation}\n\n## Candidate replies\n\n{shown}"
    return [{"role": "system", "content": RUBRIC}, {"role": "user", "content": user}]


def _json_object(text: str) -> Any:
    """The JSON object in `text`: the whole text, a fenced ```json block, or the last complete {...} in it. A
    reasoning model's <think>...</think> (drafts included) is not its answer."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    for candidate in [text.strip()] + ([fenced.group(1)] if fenced else []):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    decoder, found, start = json.JSONDecoder(), None, text.find("{")
    while start != -1:
        try:
            found, end = decoder.raw_decode(text, start)
            start = text.find("{", end)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    if found is None:
        raise JudgeMalformed(f"no JSON object in the judge's answer: {text[:120]!r}")
    return found


def parse_judgement(text: str | None, order: list[int]) -> tuple[list[float], list[str]]:
    """Scores and reasons per candidate in the original order, from the judge's answer about the shown order.
    Every shown id must be scored exactly once; anything else raises JudgeMalformed (never guessed)."""
    if not text:
        raise JudgeMalformed("the judge's answer is empty")
    try:
        answer = _Answer.model_validate(_json_object(text))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise JudgeMalformed(f"judge JSON invalid at {where or 'top level'}: {first['msg']}") from None
    labels = [str(entry.id).strip() for entry in answer.scores]
    expected = [str(position + 1) for position in range(len(order))]
    if sorted(labels) != sorted(expected):
        raise JudgeMalformed(f"judge scored ids {labels}, expected each of {expected} once")
    scores, reasons = [0.0] * len(order), [""] * len(order)
    for label, entry in zip(labels, answer.scores):
        index = order[int(label) - 1]
        scores[index], reasons[index] = float(entry.score), entry.reason
    return scores, reasons


def rule_scores(record: dict, candidates: list[str]) -> list[float]:
    """10 for each candidate that `mateconv.tasks.check_answer` accepts, 1 for the others."""
    return [RULE_SCORES[bool(check_answer(record, candidate))] for candidate in candidates]


def combine(rule: list[float] | None, model: list[float] | None) -> list[float]:
    """Final scores. rule alone or model alone as they are; both: rule + model / 10, so a correct reply always
    beats an incorrect one and the model's score orders replies that are equally correct."""
    if rule is not None and model is not None:
        return [r + m / 10 for r, m in zip(rule, model)]
    scores = rule if rule is not None else model
    assert scores is not None, "combine() needs at least one judge's scores"
    return scores


@dataclass
class Verdict:
    chosen: int | None  # index into the candidates, None when the prompt is dropped
    rejected: int | None
    margin: float
    dropped: str | None  # why no pair: "empty", "tie", "identical" or "margin"


def non_empty(candidates: list[str]) -> list[int]:
    return [i for i, text in enumerate(candidates) if text.strip()]


def pick_pair(scores: list[float], candidates: list[str], min_margin: float) -> Verdict:
    """Best as chosen, worst as rejected (the first one on equal scores) among the non-empty replies (stage 3
    refuses empty sides); ties, identical texts and margins under `min_margin` are dropped."""
    usable = non_empty(candidates)
    if len(usable) < 2:
        return Verdict(None, None, 0.0, "empty")
    best = max(usable, key=lambda i: (scores[i], -i))
    worst = min(usable, key=lambda i: (scores[i], i))
    margin = scores[best] - scores[worst]
    if margin <= 0:
        return Verdict(None, None, 0.0, "tie")
    if candidates[best].strip() == candidates[worst].strip():
        return Verdict(None, None, margin, "identical")
    if margin < min_margin:
        return Verdict(None, None, margin, "margin")
    return Verdict(best, worst, margin, None)


def choose_pair(rule: list[float] | None, model: list[float] | None, candidates: list[str],
                min_margin: float) -> tuple[list[float], Verdict]:
    """The final scores (`combine`) and the pair. With both judges the rule decides where it tells the non-empty
    replies apart; where it scores them all alike (all right, or all wrong) the model judge's scores decide, and the
    margin held against `min_margin` is the model's own (its 1-10 scale, not the tenth of it in the final scores)."""
    scores = combine(rule, model)
    if rule is not None and model is not None and len({rule[i] for i in non_empty(candidates)}) == 1:
        return scores, pick_pair(model, candidates, min_margin)
    return scores, pick_pair(scores, candidates, min_margin)
