"""The reference model's language model, pretrained on text alone (before it meets an image).

BLIP-2's OPT was pretrained on text and is frozen when the Q-Former is trained, so text at
any position is normal to it and it has never seen a query token. The miniature copies
that: a small OPT learns, from generated text only, the two things stage 2 will ask of it
with a description standing where the query tokens will stand:

* reading an answer off a description (``"{caption} </s> Question: {q} Short answer: {a} </s>"``);
* repeating a description (``"{caption} </s> {caption} </s>"``), as a caption row of stage 2
  generates the caption after the soft prompt;

each at a random position offset (``position_ids`` start anywhere in ``0..text_max_offset``),
so that a prompt after 4 query tokens is as normal as after 32. The loss is on what follows
the ``</s>`` (the answer, or the repeated caption): the description itself is random and
carries no signal. With the loss on every token instead, and 15% of rows that ask a question
with no description, the model stayed on the answers' prior: "what shape is in the image?"
was at chance after 3,000 steps (docs/reference-model.md).

The text is :func:`text_corpus`: generated descriptions of symbolic scenes with one question
each; nothing is drawn.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Any

from catp.reference.data import (
    COLORS,
    COLUMNS,
    EASY_VQA_TEMPLATES,
    SHAPES,
    SIZES,
    SceneObject,
    format_prompt,
    scene_caption,
    scene_questions,
)
from catp.training import optimization_step, optimizer_and_schedule, progress

__all__ = [
    "REPEAT_SHARE",
    "Rewrite",
    "TEXT_SINGLE_SHARE",
    "easy_vqa_style_question",
    "pretrain_language_model",
    "question_kind",
    "reading_accuracy",
    "reads_answer",
    "text_corpus",
    "text_sequences",
]


def easy_vqa_style_question(shape: str, color: str, rng: random.Random) -> tuple[str, str]:
    """One easy-VQA-style ``(question, answer)`` about an image of one ``color`` ``shape``.

    For text-only data (the language model's pretraining): easy-VQA's own templates and
    answers; yes/no questions name the right colour or shape about half of the time.
    """
    kind = rng.choice(list(EASY_VQA_TEMPLATES))
    template = rng.choice(EASY_VQA_TEMPLATES[kind])
    if kind in ("color", "shape"):
        return template.format(c=color, s=shape), color if kind == "color" else shape
    asked_color = color if rng.random() < 0.5 else rng.choice(list(COLORS))
    asked_shape = shape if rng.random() < 0.5 else rng.choice(SHAPES)
    present = asked_color == color if kind.endswith("color") else asked_shape == shape
    return template.format(c=asked_color, s=asked_shape), "yes" if present != kind.startswith("not") else "no"


#: Share of :func:`text_corpus` rows that describe one object (easy-VQA style).
TEXT_SINGLE_SHARE = 0.4


def text_corpus(n: int, seed: int, single_share: float = TEXT_SINGLE_SHARE) -> list[tuple[str, str, str]]:
    """``n`` text-only ``(caption, question, answer)`` triples about symbolic scenes.

    For the language model's pretraining on text: nothing is drawn. A ``single_share`` of
    them (40%) describe one object and ask an easy-VQA-style question; the rest describe
    1-5 objects as the scenes task does (distinct colours, left to right) and ask one of its
    questions.
    """
    if not 0.0 <= single_share <= 1.0:
        raise ValueError(f"single_share must be in [0, 1], got {single_share!r}")
    rng = random.Random(seed)
    names = list(COLORS)
    out = []
    for _ in range(n):
        single = rng.random() < single_share
        count = 1 if single else rng.randint(1, COLUMNS)
        objects = tuple(
            SceneObject(rng.choice(SHAPES), color, float(i), 0.0, rng.choice(list(SIZES))) for i, color in enumerate(rng.sample(names, count))
        )
        question, answer = easy_vqa_style_question(objects[0].shape, objects[0].color, rng) if single else rng.choice(scene_questions(objects, rng))
        out.append((scene_caption(objects), question, answer))
    return out


#: A probe's change to the text: ``(caption, question) -> (caption, question)``.
Rewrite = Callable[[str, str], tuple[str, str]]

#: Share of :func:`text_sequences` that repeat a description; the rest ask a question about one.
REPEAT_SHARE = 0.15


def text_sequences(tokenizer, count: int, seed: int, single_share: float = TEXT_SINGLE_SHARE, rewrite: Rewrite | None = None) -> list[tuple[list[int], int]]:
    """``count`` ``(token ids, target start)`` pairs of the two kinds above.

    The loss is on the tokens from ``target start`` on (the answer or the repeated
    description, and the closing ``</s>``). ``single_share``: the share of one-object
    descriptions (the recipe's by default);
    ``rewrite``: maps every ``(caption, question)`` to the pair used (for probes; the recipe has none).
    """
    rng = random.Random(seed)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    words = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    out = []
    for caption, question, answer in text_corpus(count, seed, single_share):
        if rewrite is not None:
            caption, question = rewrite(caption, question)
        caption_ids = words(caption)
        described = [*caption_ids, bos]
        if rng.random() < REPEAT_SHARE:
            context, target = described, caption_ids
        else:
            context, target = [*described, *words(format_prompt(question))], words(answer)
        out.append(([*context, *target, eos], len(context)))
    return out


def pretrain_language_model(lm, tokenizer, settings: Any, log: logging.Logger, show: bool, single_share: float = TEXT_SINGLE_SHARE,
                            rewrite: Rewrite | None = None) -> float:
    """Train ``lm`` (a causal LM: the recipe's OPT or LLaMA) on :func:`text_sequences`; returns the last epoch's mean loss.

    ``settings`` is a :class:`lab.train.TrainSettings` (``text_*`` fields,
    ``text_max_offset``, ``seed``). ``single_share`` and ``rewrite`` are for probes
    (:func:`text_sequences`); ``rewrite`` applies to the held-out texts too.
    """
    import torch

    sequences = text_sequences(tokenizer, settings.text_sequences, settings.seed + 6, single_share, rewrite)
    length = max(len(s) for s, _ in sequences)
    ids = torch.full((len(sequences), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    for i, (s, start) in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, start : len(s)] = ids[i, start : len(s)]
    lengths = torch.tensor([len(s) for s, _ in sequences])
    limit = lm.config.max_position_embeddings - length
    if settings.text_max_offset > limit:
        raise ValueError(f"text_max_offset {settings.text_max_offset} leaves no room for {length} tokens in {lm.config.max_position_embeddings} positions")
    steps_per_epoch = math.ceil(len(sequences) / settings.text_batch_size)
    params = list(lm.parameters())
    optimizer, scheduler = optimizer_and_schedule(params, settings.text_lr, steps_per_epoch * settings.text_epochs)
    generator = torch.Generator().manual_seed(settings.seed + 7)
    lm.train()
    bar = progress(steps_per_epoch * settings.text_epochs, "language model", show)
    mean = 0.0
    for epoch in range(settings.text_epochs):
        order = torch.randperm(len(sequences), generator=generator)
        total, steps = 0.0, 0
        for i in range(0, len(sequences), settings.text_batch_size):
            idx = order[i : i + settings.text_batch_size]
            width = int(lengths[idx].max())
            batch = ids[idx, :width]
            mask = (torch.arange(width) < lengths[idx, None]).long()
            offsets = torch.randint(0, settings.text_max_offset + 1, (len(idx), 1), generator=generator)
            logits = lm(input_ids=batch, attention_mask=mask, position_ids=offsets + torch.arange(width)).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[idx, 1:width].reshape(-1), ignore_index=-100)
            optimization_step(loss, params, optimizer, scheduler)
            total += loss.item()
            steps += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / steps:.3f}")
        mean = total / max(1, steps)
        reading = reading_accuracy(lm, tokenizer, settings.seed + 11, rewrite=rewrite)
        log.info("language model epoch %d/%d: loss %.4f, held-out answers read off a caption: %.4f (%s)", epoch + 1, settings.text_epochs, mean,
                 reading.pop("all"), ", ".join(f"{k} {v:.2f}" for k, v in reading.items()))
        lm.train()
    bar.close()
    lm.eval()
    return mean


def question_kind(caption: str, question: str) -> str:
    """A held-out row's kind: ``"one object: what shape"`` or ``"scene: how many"`` (the question's first two words)."""
    return f"{'scene' if ',' in caption else 'one object'}: {' '.join(question.split()[:2])}"


def reading_accuracy(lm, tokenizer, seed: int, count: int = 1000, rewrite: Rewrite | None = None) -> dict[str, float]:
    """Share of held-out "caption </s> question" texts whose greedy first answer token is right.

    Returns ``{"all": ..., kind: ...}`` with one entry per :func:`question_kind`: whether the
    language model reads an answer off a description, the skill a frozen LM needs in stage 2.
    ``rewrite`` maps each ``(caption, question)`` as in :func:`text_sequences` (for probes).
    """
    right: dict[str, list[int]] = {}
    for caption, question, answer in text_corpus(count, seed):
        kind = question_kind(caption, question)
        if rewrite is not None:
            caption, question = rewrite(caption, question)
        right_answer = reads_answer(lm, tokenizer, caption, question, answer)
        for key in ("all", kind):
            right.setdefault(key, []).append(int(right_answer))
    return {key: sum(v) / len(v) for key, v in sorted(right.items())}


def reads_answer(lm, tokenizer, caption: str, question: str, answer: str) -> bool:
    """Whether ``lm``'s greedy first token after ``"{caption} </s> Question: {question} Short answer:"`` is ``answer``'s first token."""
    import torch

    words = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = [*words(caption), tokenizer.bos_token_id, *words(format_prompt(question))]
    lm.eval()
    with torch.no_grad():
        return int(lm(input_ids=torch.tensor([prompt])).logits[0, -1].argmax()) == words(answer)[0]
