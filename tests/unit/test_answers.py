"""Answer scoring (training.answers): the documented extractor and exact match after normalisation."""

from __future__ import annotations

import pytest

from training.answers import answers_match, extract_answer, normalize_answer, score


@pytest.mark.parametrize(("text", "want"), [
    ("so the sum is \\boxed{42}.", "42"),
    ("first \\boxed{1}, then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # the last box, nested braces whole
    ("The answer is 17.", "17"),
    ("the final answer is: x = 5\nmore text", "x = 5"),
    ("We get 3, then 4, then 12 apples", "12"),
    ("Total: 1,000 dollars", "1,000"),
    ("<think>I guess 7. Wait, 8.</think>It is 9.", "9"),  # the answer after the thinking
    ("<think>The answer is 7</think>\\boxed{8}", "8"),
    ("The answer is 5. \\boxed{6}", "6"),  # a box wins over the phrase
    ("no number at all", None),
    ("\\boxed{unclosed", None),
    ("<think>only thinking, the answer is 3", "3"),  # never closed: the whole text
])
def test_extractor(text: str, want: str | None) -> None:
    assert extract_answer(text) == want


@pytest.mark.parametrize(("got", "want", "same"), [
    ("7", "7", True),
    ("7.0", "7", True),
    ("$1,000$", "1000", True),
    ("0.50", ".5", True),
    ("-3", "-3", True),
    ("\\text{Paris}", "paris", True),
    ("12 apples", "12", True),  # a numeric answer: the first number of the phrase
    ("x = 5", "5", True),
    ("75", "57", False),
    ("7.", "7", True),
    ("Paris France", "paris", False),
    (None, "7", False),
])
def test_match_after_normalisation(got: str | None, want: str, same: bool) -> None:
    assert answers_match(got, want) is same


def test_score_generations() -> None:
    assert score("<think>3 + 4 is 7. Wait, check: 7.</think>The answer is 7.", "7") is True
    assert score("<think>3 + 4 is 7.</think>The answer is 8.", 7) is False
    assert score("I don't know", "7") is False
    assert score("anything", None) is None and score("anything", " ") is None
    assert normalize_answer(" $\\text{ Yes }$. ") == "yes"
