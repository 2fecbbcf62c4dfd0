"""The VQA accuracy metric (VQA challenge rules), written from the published rules.

Normalisation of an answer (prediction and human answers alike):

1. newlines and tabs become spaces; surrounding whitespace is stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is *deleted* when
   the answer has that mark next to a space, or has a comma between two digits
   anywhere (``"1,000"``); otherwise it is *replaced by a space* (``"red-white"`` ->
   ``"red white"``);
3. periods: a period not followed by a digit is deleted (``"yes."`` -> ``"yes"``,
   ``"2.5"`` kept);
4. lower case, split on whitespace, number words ``none/zero..ten`` -> digits, the
   articles ``a/an/the`` dropped, and contractions written without their apostrophe
   get it back (``"dont"`` -> ``"don't"``); words joined by single spaces.

Accuracy of a prediction against ``n`` human answers: for each answer ``i``, count
the *other* answers equal to the prediction, ``acc_i = min(1, count / 3)``; the score
is the mean of ``acc_i`` (the official 10 leave-one-out subsets when ``n == 10``).
With a single answer it is normalised exact match.

Where this differs from the official script, on purpose (none of it changes a score
on the official, already normalised VQAv2 / OK-VQA annotations):

* the official script normalises the human answers only when they disagree, and then
  only their punctuation; here every answer gets the full normalisation, so raw
  answers of other datasets (``"Two"``, ``"the dog"``) compare as intended;
* its period removal passes ``re.UNICODE`` where the *count* argument goes (at most
  32 periods removed); here every period is.

Its contraction table is reproduced in effect, including its oddities: entries with
a capital ``I`` (``"Im"``) never match after lower-casing, and ``"somebody'd"`` maps
to ``"somebodyd"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["normalize_answer", "vqa_accuracy"]

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions, written with all their apostrophes. Each spelling that lacks exactly
# one of them maps back to the full form ("couldnt've" and "couldn'tve" -> "couldn't've").
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's
where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for full in _CONTRACTED:
        for i, char in enumerate(full):
            if char == "'":
                table[full[:i] + full[i + 1:]] = full
    # The official table's one entry that goes the other way.
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _contraction_table()


def _strip_punctuation(text: str) -> str:
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The test looks at the original text, as the official rules do.
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _normalize_words(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """Normalise one answer by the VQA rules (see the module docstring).

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    """
    if not isinstance(answer, str):
        raise TypeError(f"an answer must be a str, got {type(answer).__name__} {answer!r}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _normalize_words(_strip_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of ``prediction`` against the human ``answers``, in ``[0, 1]``.

    ``min(1, #other humans who gave it / 3)`` averaged over leaving each human out
    (10 answers: the official metric; 1 answer: normalised exact match).

    >>> vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7)
    0.9
    """
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError(f"answers must be a list of str, got {type(answers).__name__}")
    if not answers:
        raise ValueError("answers is empty: a question needs at least one reference answer")
    predicted = normalize_answer(prediction)
    matches = sum(normalize_answer(answer) == predicted for answer in answers)
    if len(answers) == 1:
        return float(matches)
    # Leaving out a matching answer leaves matches - 1 others; a non-matching one, matches.
    n = len(answers)
    total = matches * min(1.0, (matches - 1) / 3) + (n - matches) * min(1.0, matches / 3)
    return total / n
