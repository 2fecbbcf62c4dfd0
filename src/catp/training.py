"""Generic training helpers: AdamW with a warm-up and cosine decay, one clipped optimisation step, a progress bar.

The reference model's recipe (``lab/`` in the repository) trains every stage with these.
torch and tqdm are imported inside the functions, so that importing ``catp`` stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from tqdm.auto import tqdm

__all__ = ["warmup_cosine", "optimizer_and_schedule", "optimization_step", "progress"]


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
    import torch

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, total_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, warmup))
    return optimizer, scheduler


def optimization_step(
    loss: torch.Tensor, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_norm: float = 1.0,
) -> None:
    """Backpropagate the scalar ``loss``, clip the gradients of ``params`` to a total norm of ``max_norm``, step the optimizer and the schedule.

    ``max_norm=math.inf`` leaves the gradients as they are.
    """
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    scheduler.step()


def progress(total: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar of ``total`` steps labelled ``desc``; it prints nothing when ``enabled`` is false."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)
