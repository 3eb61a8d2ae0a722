"""Reading a verifiable task's answer back from a reply: markers, numbers by value, words without punctuation."""
from __future__ import annotations

import pytest

from mateconv.tasks import check_answer


@pytest.mark.parametrize("answer, response, correct", [
    ("12", "The answer is 12.", True),
    ("12", "答案是 12。", True),
    ("12", "答案是12", True),
    ("12", "12", True),
    ("12", "7 plus 5 equals 12. The answer is 12.", True),
    ("12", "The answer is 12.0", True),
    ("12", "the answer is 13.", False),
    ("12", "The answer is 120.", False),
    ("12", "12 or 13", False),  # no marker and two candidates
    ("12", "", False),
    ("星期二", "答案是 星期二。", True),
    ("星期二", "答案是星期三。", False),
    ("星期二", "星期二", True),
    ("Tuesday", "The answer is tuesday!", True),
    ("apple", 'The answer is "apple".', True),
    ("apple", "The answer is apples.", False),
    ("300", "答案是 300。谢谢", True),
])
def test_check_answer(answer, response, correct):
    assert check_answer({"answer": answer}, response) is correct
