"""Answers of a BLIP-2 to the reference tasks, unpruned and pruned, and their exact match.

Greedy decoding with plain ``model.generate`` (inside :func:`catp.pruned` for pruned
runs); the score is exact match of the whole decoded answer (lower-cased, stripped).
The commands that check the reference model's floors and print the pruning table are in
the repository's ``lab/evaluate.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from catp.hf import pruned
from catp.reference.data import VQAExample, format_prompt

__all__ = ["MAX_NEW_TOKENS", "answer", "exact_match"]


#: New tokens for greedy answers (the floors of the reference model are stated with up to 5).
MAX_NEW_TOKENS = 5


def answer(model, processor, examples: Sequence[VQAExample], method: str | None = None, keep: int | None = None, batch_size: int = 256, max_new_tokens: int = MAX_NEW_TOKENS, sessions: list | None = None) -> list[str]:
    """Greedy answers of ``model`` to ``examples`` (optionally pruned to ``keep`` tokens with ``method``).

    Args:
        sessions: if given, each batch's ``keep_indices`` ``(batch, keep)`` is appended to it.

    Returns:
        one decoded answer per example.
    """
    if (method is None) != (keep is None):
        raise ValueError("give both method and keep, or neither")
    answers: list[str] = []
    options = {"seed": 0} if method == "random" else {}
    context = pruned(model, method=method, keep=keep, **options) if method is not None else contextlib.nullcontext()
    with context as session, torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            inputs = processor(images=[e.image for e in chunk], text=[format_prompt(e.question) for e in chunk], padding=True, return_tensors="pt")
            out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
            answers.extend(a.strip() for a in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
            if sessions is not None and session is not None:
                sessions.append(session.keep_indices.clone())
    return answers


def exact_match(predictions: Sequence[str], examples: Sequence[VQAExample]) -> float:
    """Share of predictions equal to the answer (lower-cased, stripped)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("no examples")
    return sum(p.strip().lower() == e.answer.strip().lower() for p, e in zip(predictions, examples)) / len(examples)
