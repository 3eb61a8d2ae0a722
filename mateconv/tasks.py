"""Verifiable task answers: the one short form replies state them in, and the checker that reads them back.

The embedded demo data writes its replies in `ANSWER_FORM`; stage 6 (task accuracy) and stage 7 (the rule judge)
grade replies with `check_answer`.
"""
from __future__ import annotations

import re
import unicodedata

ANSWER_FORM = {"en": "The answer is {}.", "zh": "答案是 {}。"}
_MARKERS = re.compile(r"(?:the answer is|answer:|答案是|答案[:：]|答[:：])\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_STRIP = " \t\n\"'“”‘’`*.,!?;:。，！？；：、()（）[]【】"


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip().strip(_STRIP).lower()


def extract_answer(response: str) -> str:
    """The text after the last answer marker up to the end of its sentence; without a marker, the first line."""
    response = unicodedata.normalize("NFKC", response)
    found = list(_MARKERS.finditer(response))
    rest = response[found[-1].end():] if found else response.strip()
    return re.split(r"(?<=[^\d])[.。!！?？\n]|[。!！?？\n]|\.(?!\d)", rest, maxsplit=1)[0].strip()


def check_answer(record: dict, response: str) -> bool:
    """Is the model's response correct for a task record (`answer` field)? Robust to wording around the answer:
    numbers compare by value (first number after the marker, or the only number of an unmarked reply),
    words compare case-insensitively without quotes/punctuation."""
    expected = _normalise(str(record["answer"]))
    candidate = extract_answer(response)
    if _NUMBER.fullmatch(expected):
        numbers = _NUMBER.findall(candidate)
        has_marker = bool(_MARKERS.search(unicodedata.normalize("NFKC", response)))
        if not numbers or (not has_marker and len(set(numbers)) != 1):
            return False
        return float(numbers[0]) == float(expected)
    candidate = _normalise(candidate)
    return candidate == expected or candidate.split(" ")[0] == expected
