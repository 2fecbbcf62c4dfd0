"""Where kept query tokens go in the language model's sequence: pure index helpers.

The placeholders of a prompt stand for the query tokens in order (the stock
``masked_scatter`` fills them so). Pruning keeps every text token and the placeholders of
the kept queries; :func:`kept_positions` says where each token of the shortened sequence
comes from, :func:`take_positions` shortens a tensor by it and :func:`put_positions` maps
per-position outputs (logits) back to the caller's positions.
"""

from __future__ import annotations

from typing import Literal

import torch


def kept_positions(
    is_placeholder: torch.Tensor, keep_indices: torch.Tensor, fillers: Literal["left", "right"]
) -> torch.Tensor:
    """Where each token of the shortened sequence comes from in the caller's.

    The ``i``-th placeholder of a row holds query token ``i`` (frame-major for video): the
    stock ``masked_scatter`` fills them in order. The shortened row keeps every other
    token and the placeholders of the kept queries, in their order, then pads to the
    batch's longest row with fillers on the ``fillers`` side.

    Args:
        is_placeholder: ``(B, L)`` bool, the placeholder positions of ``input_ids`` (``input_ids == id``, or a
            family's own mask), each row with at most ``P`` of them.
        keep_indices: ``(B, K)`` kept query indices in ``0..P-1``, padded with ``-1``.
        fillers: ``"left"`` (decoder-only LLMs) or ``"right"`` (T5).

    Returns:
        ``(B, L')`` long: the caller's position of each token, ``-1`` for a filler.
    """
    num_placeholders = int(is_placeholder.sum(dim=1).max())
    # kept[b, i]: query i of sample b is kept (the -1 padding lands in a spare column).
    kept = torch.zeros(is_placeholder.shape[0], num_placeholders + 1, dtype=torch.bool, device=is_placeholder.device)
    kept.scatter_(1, keep_indices.to(is_placeholder.device).masked_fill(keep_indices < 0, num_placeholders), True)
    rank = (is_placeholder.cumsum(dim=1) - 1).clamp(min=0)
    keep = ~is_placeholder | kept[:, :num_placeholders].gather(1, rank.clamp(max=num_placeholders - 1))
    # Kept positions first, ascending (a stable sort of "dropped").
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)
    lengths = keep.sum(dim=1, keepdim=True)
    slots = torch.arange(int(lengths.max()), device=is_placeholder.device).expand(is_placeholder.shape[0], -1)
    if fillers == "left":
        source = slots - (slots.shape[1] - lengths)
    elif fillers == "right":
        source = slots.masked_fill(slots >= lengths, -1)
    else:
        raise ValueError(f"fillers must be 'left' or 'right', got {fillers!r}")
    return order.gather(1, source.clamp(min=0)).masked_fill(source < 0, -1)


def take_positions(tensor: torch.Tensor, positions: torch.Tensor, fill: float | int) -> torch.Tensor:
    """``tensor[b, positions[b, j], ...]``, and ``fill`` where the position is ``-1``.

    Args:
        tensor: ``(B, L, ...)``.
        positions: ``(B, L')`` from :func:`kept_positions`.

    Returns:
        ``(B, L', ...)``.
    """
    positions = positions.to(tensor.device)
    trailing = (1,) * (tensor.dim() - 2)
    index = positions.clamp(min=0).view(*positions.shape, *trailing).expand(*positions.shape, *tensor.shape[2:])
    return tensor.gather(1, index).masked_fill((positions < 0).view(*positions.shape, *trailing), fill)


def put_positions(values: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of :func:`take_positions`: ``(B, L', ...)`` values at their caller positions in zeros ``(B, length, ...)``."""
    positions = positions.to(values.device)
    # Fillers go to a spare last position, cut off after the scatter.
    target = positions.masked_fill(positions < 0, length)
    index = target.view(*target.shape, *(1,) * (values.dim() - 2)).expand_as(values)
    full = values.new_zeros(values.shape[0], length + 1, *values.shape[2:])
    return full.scatter(1, index, values)[:, :length]
