"""The VQA accuracy on hand-made cases, one or more per normalisation rule."""

from __future__ import annotations

import pytest

import catp
from catp.evaluation.metric import normalize_answer


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        # whitespace: newlines / tabs are spaces, ends stripped, runs collapsed
        ("  yes\n", "yes"),
        ("red\tcar", "red car"),
        # case
        ("YES", "yes"),
        # punctuation next to a space is deleted ...
        ("yes !", "yes"),
        ("(left) side", "left side"),
        # ... otherwise replaced by a space
        ("red-white", "red white"),
        ("t-shirt", "t shirt"),
        ("left/right", "left right"),
        ("yes!", "yes"),
        ('"stop"', "stop"),
        # a comma between digits anywhere deletes every mark: "1,000" and "a-b" both collapse
        ("1,000", "1000"),
        ("1,000 red-white", "1000 redwhite"),
        # periods: deleted unless a digit follows
        ("yes.", "yes"),
        ("2.5", "2.5"),
        ("mr. smith", "mr smith"),
        ("3.", "3"),
        (".5", ".5"),
        # apostrophes are not punctuation
        ("don't", "don't"),
        # number words -> digits, whole words only
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        ("zero", "0"),
        ("eleven", "eleven"),
        ("someone", "someone"),
        ("two dogs", "2 dogs"),
        # articles dropped, whole words only
        ("a dog", "dog"),
        ("the an apple", "apple"),
        ("An owl", "owl"),
        ("theater", "theater"),
        # contractions without their apostrophe get it back
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("cant", "can't"),
        ("whats", "what's"),
        ("oclock", "o'clock"),
        ("twas", "'twas"),
        # double contractions: either missing apostrophe
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("yall'd've", "y'all'd've"),
        ("y'alld've", "y'all'd've"),
        # the official table's oddities: capital-I entries never match; one entry is reversed
        ("im", "im"),
        ("ive", "ive"),
        ("somebody'd", "somebodyd"),
        # not in the table
        ("its", "its"),
        # everything at once
        ("The two red-white cars.", "2 red white cars"),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def _ten(matching: int, answer: str = "yes", other: str = "no") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


@pytest.mark.parametrize(("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_answers_leave_one_out(matching, expected):
    # 3 of 10 humans: 3 subsets see 2 matches (2/3), 7 see 3 (1): (3*2/3 + 7) / 10 = 0.9.
    assert catp.vqa_accuracy("yes", _ten(matching)) == pytest.approx(expected)


def test_ten_answers_brute_force_formula():
    answers = ["2", "two", "3", "2", "2 ", "many", "3", "3", "3", "three"]
    # "2": three "2"-like answers plus "two" -> four matches after normalisation.
    subsets = [answers[:i] + answers[i + 1:] for i in range(10)]
    expected = sum(min(1.0, sum(normalize_answer(a) == "2" for a in s) / 3) for s in subsets) / 10
    assert catp.vqa_accuracy("Two.", answers) == pytest.approx(expected) == pytest.approx(1.0)
    assert catp.vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert catp.vqa_accuracy("many", answers) == pytest.approx(0.3)


def test_prediction_and_answers_are_normalised():
    assert catp.vqa_accuracy("The Dog.", ["dog"] * 10) == 1.0
    assert catp.vqa_accuracy("dog", ["a dog"] * 10) == 1.0
    assert catp.vqa_accuracy("cat", ["a dog"] * 10) == 0.0


def test_single_answer_is_normalised_exact_match():
    assert catp.vqa_accuracy("Yes.", ["yes"]) == 1.0
    assert catp.vqa_accuracy("two", ["2"]) == 1.0
    assert catp.vqa_accuracy("no", ["yes"]) == 0.0


def test_other_answer_counts_use_leave_one_out():
    # n = 2, both match: each subset has 1 match -> 1/3.
    assert catp.vqa_accuracy("red", ["red", "red"]) == pytest.approx(1 / 3)
    # n = 5 with 4 matches: 4 subsets with 3 (1.0), 1 with 4 (1.0).
    assert catp.vqa_accuracy("red", ["red"] * 4 + ["blue"]) == pytest.approx(1.0)
    # n = 5 with 2 matches: 2 subsets with 1 (1/3), 3 with 2 (2/3) -> (2/3 + 2) / 5.
    assert catp.vqa_accuracy("red", ["red"] * 2 + ["blue"] * 3) == pytest.approx((2 / 3 + 2) / 5)


@pytest.mark.parametrize(("prediction", "answers", "error"), [
    ("yes", [], ValueError),
    ("yes", "yes", TypeError),
    (None, ["yes"], TypeError),
    ("yes", ["yes", 3], TypeError),
])
def test_bad_input(prediction, answers, error):
    with pytest.raises(error):
        catp.vqa_accuracy(prediction, answers)
