"""Training helpers shared by ``catp adapt`` and the reference model's recipe (``lab/`` in the
repository): AdamW with a warm-up and cosine decay, one clipped optimisation step, a progress
bar, and VQA batches with the loss on the answer only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["answer_batch", "optimization_step", "optimizer_and_schedule", "progress", "warmup_cosine"]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at ``step`` of ``total``: linear warm-up over ``warmup`` steps, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_and_schedule(
    params: Sequence[torch.Tensor], lr: float, total_steps: int, weight_decay: float = 0.01,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on ``params`` at peak rate ``lr``, and its :func:`warmup_cosine` schedule over ``total_steps`` (5% warm-up).

    Step the schedule once per optimizer step (:func:`optimization_step` does both).
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, total_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, warmup))
    return optimizer, scheduler


def optimization_step(
    loss: torch.Tensor, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_norm: float = 1.0, sum_gradients: bool = False,
) -> None:
    """Backpropagate the scalar ``loss``, clip the gradients of ``params`` to a total norm of ``max_norm``, step the optimizer and the schedule.

    ``max_norm=math.inf`` leaves the gradients as they are. ``sum_gradients``: add up the
    gradients of every process of a ``torch.distributed`` run first (each process's loss is its
    share of the batch's), so that every process takes the same step.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sum_gradients:
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            torch.distributed.all_reduce(param.grad)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    scheduler.step()


def progress(total: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar of ``total`` steps labelled ``desc``; it prints nothing when ``enabled`` is false."""
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def answer_batch(processor: Any, images: Sequence[Any], prompts: Sequence[str], answers: Sequence[str],
                 position_inputs: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Processor inputs for ``prompt + " " + answer + EOS`` with ``labels`` on the answer and EOS only.

    For a decoder-only language model whose processor pads on the left (as
    :func:`catp.models.load_model` sets it): every row then ends at the right edge, so the EOS
    column is appended to all rows, and the answer is the last tokens of each row. The answer's
    token count is read per row as ``len(tokens(prompt + " " + answer)) - len(tokens(prompt))``,
    which holds for word-level and BPE tokenizers alike.

    Args:
        position_inputs: the processor's other per-position outputs ``(B, L)`` (a family's
            :attr:`~catp.families.base.Family.position_inputs`: Kosmos-2's ``image_embeds_position_mask``),
            which get 0 in the EOS column.

    Returns:
        The processor's tensors (``pixel_values``, ``input_ids``, ``attention_mask``) and
        ``labels`` ``(B, L)``: the token ids on the answer and EOS, ``-100`` elsewhere (the image
        placeholders, the prompt and the padding).

    Raises:
        ValueError: a tokenizer that does not pad on the left, or an empty answer.
    """
    tokenizer = processor.tokenizer
    if tokenizer.padding_side != "left":
        raise ValueError("answer-only labels need a processor that pads on the left (a decoder-only language model)")
    if any(not a.strip() for a in answers):
        raise ValueError("every question needs a non-empty answer to train on")
    full = [f"{p} {a.strip()}" for p, a in zip(prompts, answers)]
    inputs = processor(images=list(images), text=full, return_tensors="pt", padding=True)
    lengths = [len(tokenizer(f)["input_ids"]) - len(tokenizer(p)["input_ids"]) for f, p in zip(full, prompts)]
    eos = torch.full((len(full), 1), tokenizer.eos_token_id, dtype=inputs["input_ids"].dtype)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], eos], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(eos)], dim=1)
    for name in position_inputs:
        inputs[name] = torch.cat([inputs[name], torch.zeros_like(eos, dtype=inputs[name].dtype)], dim=1)
    width = inputs["input_ids"].shape[1]
    answer_part = torch.arange(width) >= width - 1 - torch.tensor(lengths)[:, None]  # the answer's tokens and EOS
    inputs["labels"] = inputs["input_ids"].masked_fill(~answer_part, -100)
    return dict(inputs)
