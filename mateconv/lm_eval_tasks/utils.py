"""Prompts, answer choices and scoring for the lm-eval tasks over MateConv's verifiable prompts (the embedded demo
data's `tasks_*.jsonl`): the same user message, chat template and `check_answer` as `mateconv.evaluate`."""
from __future__ import annotations

import random
import re

from mateconv.data.embedded import WEEKDAYS
from mateconv.tasks import ANSWER_FORM, check_answer

N_CHOICES = 4


def doc_to_text(doc: dict) -> str:
    return doc["messages"][-1]["content"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"acc": float(check_answer(doc, results[0]))}


def _wrong_answers(doc: dict) -> list[str]:
    answer, question = str(doc["answer"]), doc_to_text(doc)
    if re.fullmatch(r"-?\d+", answer):
        value = int(answer)
        pool = [int(n) for n in re.findall(r"-?\d+", question)] + [value + 1, value - 1, value + 2, value + 10]
        return list(dict.fromkeys(str(n) for n in pool if n != value))
    names = WEEKDAYS.get(doc.get("lang", "en"), [])
    pool = names if answer in names else re.findall(r"\w+", question)
    return list(dict.fromkeys(word for word in pool if word != answer))


def doc_to_choice(doc: dict) -> list[str]:
    """The right answer and up to three wrong ones, each in the replies' answer form, in an order fixed by the doc."""
    options = [str(doc["answer"])] + _wrong_answers(doc)[: N_CHOICES - 1]
    random.Random(doc["id"]).shuffle(options)
    return [ANSWER_FORM[doc.get("lang", "en")].format(option) for option in options]


def doc_to_target(doc: dict) -> int:
    return doc_to_choice(doc).index(ANSWER_FORM[doc.get("lang", "en")].format(doc["answer"]))
