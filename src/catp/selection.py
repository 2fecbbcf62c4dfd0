"""From a method's output to the kept query tokens: the one path every engine takes.

:func:`choose` turns what a method makes of one vision + Q-Former run (a scorer's scores,
a selector's picks) into the kept set, for a whole batch at once, with a count per group
(a fixed ``k``, one count per row, or a per-sample :class:`~catp.budget.Budget`). The
Hugging Face hooks (:mod:`catp.hf`), the vLLM plugin (:mod:`catp.vllm`), ``catp eval``,
``bench``, ``explain`` and ``diagnose`` all go through it.

Rows and groups. :class:`~catp.methods.Captures` hold one row per image, or per frame of a
video (``T`` consecutive rows per sample). A *group* is what one count counts over:

* an image's ``Q`` query tokens (``T = 1``);
* a video sample's ``T*Q`` tokens (``scope="video"``, or ``"sample"``): one top-k over all its frames;
* one frame's ``Q`` tokens (``scope="frame"``, or ``"group"``).

The same holds for an image split into crops (Idefics2): each crop is a group, as a frame is.

Also here: :func:`resolve_keep` (what an ``int`` / ``float`` ``keep`` means) and the index
helpers :func:`keep_mask`, :func:`mask_indices` and :func:`pick_order`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from catp.budget import Budget
from catp.methods import Captures, PruningMethod, budget_refusal

#: What ``keep`` counts where a sample holds several groups (video frames, image crops): each sample's
#: ``T*Q`` tokens (``"sample"``, or ``"video"``), or each group's ``Q`` (``"group"``, or ``"frame"``).
SCOPES: tuple[str, ...] = ("video", "frame", "sample", "group")
#: The scopes that count over a whole sample.
SAMPLE_SCOPES: tuple[str, ...] = ("video", "sample")

Keep = int | float | Budget


@dataclass(frozen=True)
class Choice:
    """What a method chose for one batch (from :func:`choose`), per sample.

    Indices are flat over a sample's ``T*Q`` tokens, frame-major (query ``i % Q`` of frame
    ``i // Q``); ``T = 1`` for images.

    Attributes:
        keep_indices: ``(B, K)`` long, each row ascending (the order the LLM receives the
            tokens), padded with ``-1`` where a sample keeps fewer than ``K``, the largest count.
        pick_order: ``(B, K)`` the same indices in the order the method picked them (a
            scorer's by descending score, ties to the lower index; a selector's greedy
            order, frame after frame), padded like ``keep_indices``.
        counts: ``(B,)`` long, tokens each sample keeps.
        scores: ``(B, T*Q)`` float scores of a scorer; ``None`` for a selector.
    """

    keep_indices: torch.Tensor
    pick_order: torch.Tensor
    counts: torch.Tensor
    scores: torch.Tensor | None


def resolve_keep(keep: int | float, num_tokens: int, of: str | None = None) -> int:
    """Turn ``keep`` into a token count.

    An ``int`` is a count in ``1..num_tokens``; a ``float`` is a fraction in ``(0, 1]``
    meaning ``round(fraction * num_tokens)``, at least 1. A ``bool`` is a ``TypeError``.

    Args:
        of: what the ``num_tokens`` are, for error messages (default: the model's query tokens).
    """
    check_keep_value(keep)
    if isinstance(keep, int):
        if keep > num_tokens:
            where = of or f"the model has {num_tokens} query tokens"
            raise ValueError(f"keep={keep} is out of range: {where}, keep 1..{num_tokens}")
        return keep
    return max(1, round(keep * num_tokens))


def check_keep_value(keep: object) -> None:
    """An int count ``>= 1`` or a float fraction in ``(0, 1]``; the upper bound of a count is the caller's."""
    check_keep_type(keep, budget_ok=False)
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"keep={keep} is out of range: keep at least 1 token")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} is out of range: a float keep is a fraction in (0, 1]")


def check_keep_type(keep: object, budget_ok: bool = True) -> None:
    """Raise a ``TypeError`` unless ``keep`` is an int, a float or (where allowed) a :class:`~catp.budget.Budget`."""
    if isinstance(keep, Budget) and budget_ok:
        return
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        also = ", or a catp.Budget" if budget_ok else ""
        raise TypeError(f"keep must be an int count or a float fraction{also}, got {type(keep).__name__} {keep!r}")


def choose(method: PruningMethod, captures: Captures, keep: int | torch.Tensor | Budget, scope: str | None = None) -> Choice:
    """The kept query tokens of a batch: the one place that turns any method into kept indices.

    A scorer is scored once (once per distinct count when its scores depend on the count,
    :meth:`~catp.methods.PruningMethod.depends_on_keep`) and each group keeps its
    ``count`` highest scores (ties to the lower index). A selector is called once per
    distinct count, on the rows with that count, and its picks are checked (shape, range,
    no repeats).

    Args:
        method: the method.
        captures: what the vision + Q-Former run exposed; ``captures.batch_size`` rows,
            ``captures.num_frames`` consecutive rows per sample.
        keep: tokens kept per group: one ``int`` count for every group, a ``(G,)`` tensor
            of counts (one per group: a vLLM batch mixes requests with different keeps), or
            a :class:`~catp.budget.Budget` (a scorer's per-group count from its own scores).
        scope: on video (``num_frames > 1``), what a group is: ``"video"`` (default), a
            sample's ``T*Q`` tokens, or ``"frame"``, one frame's ``Q``.

    Returns:
        A :class:`Choice` on ``captures.device``, per sample.

    Raises:
        ValueError: a count outside ``1..group size``; a Budget for a method that cannot
            read one; a selector over a whole video; malformed scores or picks.
    """
    frames, q = captures.num_frames, captures.num_queries
    if captures.batch_size % frames:
        raise ValueError(f"captures hold {captures.batch_size} rows, not a multiple of their {frames} frames")
    scope = _check_scope(scope, frames)
    per_sample = scope in SAMPLE_SCOPES
    samples = captures.batch_size // frames
    groups, size = (samples, frames * q) if per_sample else (captures.batch_size, q)
    if method.selects() and per_sample:
        raise ValueError(selector_refusal(method.name))
    if isinstance(keep, Budget):
        refusal = budget_refusal(method)
        if refusal is not None:
            raise ValueError(refusal)
        # catp-layer's default weights depend on the fraction: under a budget, that of its max.
        scores = _scores(method, captures, min(keep.max or size, size) / size)
        counts = keep.counts(scores.reshape(groups, size))
    else:
        counts = _counts(keep, groups, size, captures.device)
        scores = None if method.selects() else _scores_per_count(method, captures, counts, size, per_sample)
    if scores is not None:
        grouped = scores.reshape(groups, size)
        kept = keep_mask(grouped, counts).reshape(samples, frames * q)
        scores = scores.reshape(samples, frames * q)
        rank = -scores  # picked in descending score order
    else:
        kept, rank = _selections(method, captures, counts)
        kept, rank = kept.reshape(samples, frames * q), rank.reshape(samples, frames * q)
    return Choice(keep_indices=mask_indices(kept), pick_order=pick_order(rank, kept), counts=kept.sum(dim=1), scores=scores)


def selector_refusal(name: str) -> str:
    """Why a selector cannot count over a whole sample of several groups."""
    return (f"method {name!r} is a selector: on a video it picks within each frame; use scope='frame' "
            "(scope='group' for an image's crops)")


def _check_scope(scope: str | None, frames: int) -> str:
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    if frames == 1:
        return "frame"  # an image: the group is its Q tokens either way
    return scope or "video"


def _counts(keep: int | torch.Tensor, groups: int, size: int, device: torch.device) -> torch.Tensor:
    """``(G,)`` long counts from one int or a tensor of counts, each checked against ``1..size``."""
    if isinstance(keep, bool) or not isinstance(keep, (int, torch.Tensor)):
        raise TypeError(f"keep must be an int count, a (groups,) tensor of counts or a catp.Budget, got {type(keep).__name__}")
    counts = torch.as_tensor(keep, device=device)
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise TypeError(f"counts must be integers, got a {counts.dtype} tensor (resolve fractions with catp.resolve_keep)")
    counts = counts.to(torch.long).expand(groups) if counts.dim() == 0 else counts.to(torch.long)
    if counts.shape != (groups,):
        raise ValueError(f"got {tuple(counts.shape)} counts for {groups} groups of {size} tokens; give one count per group")
    if groups and (counts.min() < 1 or counts.max() > size):
        bad = counts[(counts < 1) | (counts > size)][0]
        raise ValueError(f"keep={int(bad)} is out of range: keep 1..{size} of the {size} tokens of a group")
    return counts


def _scores(method: PruningMethod, captures: Captures, keep_fraction: float) -> torch.Tensor:
    """A scorer's ``(rows, Q)`` scores, checked, in fp32 on the captures' device."""
    scores = method.score(captures, keep_fraction)
    expected = (captures.batch_size, captures.num_queries)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"method {method.name!r} returned scores of shape {got}, expected (rows, num_queries) = {expected}")
    return scores.to(captures.device, torch.float32)


def _scores_per_count(method: PruningMethod, captures: Captures, counts: torch.Tensor, size: int, per_sample: bool) -> torch.Tensor:
    """Scores of every row: once, or once per distinct count for a method whose scores depend on it."""
    distinct = counts.unique().tolist()
    if not method.depends_on_keep() or len(distinct) == 1:
        return _scores(method, captures, distinct[0] / size if distinct else 1.0)
    scores = torch.empty(captures.batch_size, captures.num_queries, device=captures.device)
    frames = captures.num_frames if per_sample else 1  # rows per group
    for count in distinct:
        rows = _rows_of(counts == count, frames)
        scores[rows] = _scores(method, captures.take_rows(rows, frames), count / size)
    return scores


def _selections(method: PruningMethod, captures: Captures, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A selector's picks, once per distinct count: ``(rows, Q)`` kept mask and pick rank.

    The rank orders a sample's picks frame after frame: ``frame * Q + position in the frame's picks``.
    """
    rows_total, q = captures.batch_size, captures.num_queries
    kept = torch.zeros(rows_total, q, dtype=torch.bool, device=captures.device)
    rank = torch.full((rows_total, q), math.inf, device=captures.device)
    for count in counts.unique().tolist():
        rows = _rows_of(counts == count, 1)
        part = captures if len(rows) == rows_total else captures.take_rows(rows, 1)
        picks = method.select(part, count)
        picks = _check_picks(picks, part, count, method.name).to(captures.device)
        positions = torch.arange(count, device=captures.device, dtype=torch.float32).expand_as(picks)
        kept[rows] = torch.zeros_like(kept[rows]).scatter(1, picks, True)
        rank[rows] = torch.full_like(rank[rows], math.inf).scatter(1, picks, positions)
    frame = torch.arange(rows_total, device=captures.device) % captures.num_frames
    return kept, rank + (frame * q)[:, None]


def _rows_of(group_mask: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """The row indices of the groups in ``group_mask`` (``rows_per_group`` consecutive rows each)."""
    groups = group_mask.nonzero().flatten()
    offsets = torch.arange(rows_per_group, device=groups.device)
    return (groups[:, None] * rows_per_group + offsets).flatten()


def _check_picks(order: torch.Tensor, captures: Captures, k: int, name: str) -> torch.Tensor:
    """A selector must return ``(rows, k)`` integer indices in ``0..Q-1``, distinct per row."""
    expected = (captures.batch_size, k)
    if not isinstance(order, torch.Tensor) or order.shape != expected or order.dtype.is_floating_point or order.dtype == torch.bool:
        got = f"a {order.dtype} tensor of shape {tuple(order.shape)}" if isinstance(order, torch.Tensor) else type(order).__name__
        raise ValueError(f"method {name!r} selected {got}, expected integer indices of shape (rows, k) = {expected}")
    if order.numel() and (order.min() < 0 or order.max() >= captures.num_queries):
        raise ValueError(f"method {name!r} selected indices outside 0..{captures.num_queries - 1}")
    ascending = order.sort(dim=1).values
    if (ascending[:, 1:] == ascending[:, :-1]).any():
        raise ValueError(f"method {name!r} selected the same query token twice in one sample")
    return order.long()


# -- index helpers ----------------------------------------------------------------------

def keep_mask(scores: torch.Tensor, counts: torch.Tensor | int) -> torch.Tensor:
    """Which tokens each row keeps: its ``counts[g]`` highest scores, ties to the lower index.

    Args:
        scores: ``(G, n)``.
        counts: ``(G,)`` counts, or one int for every row.

    Returns:
        ``(G, n)`` bool mask.
    """
    order = torch.argsort(scores.float(), dim=-1, descending=True, stable=True)
    counts = torch.as_tensor(counts, device=scores.device).expand(scores.shape[0])
    ranked = torch.arange(scores.shape[-1], device=scores.device) < counts[:, None]  # (G, n): rank < count
    return torch.zeros_like(ranked).scatter(-1, order, ranked)


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the ``True`` entries of each row, ascending, padded with ``-1``.

    Args:
        mask: ``(B, n)`` bool.

    Returns:
        ``(B, K)`` long, ``K`` the largest row count.
    """
    counts = mask.sum(dim=-1)
    width = int(counts.max()) if mask.numel() else 0
    # A stable sort of "not kept" puts the kept positions first, in ascending order.
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)[:, :width]
    return order.masked_fill(torch.arange(width, device=mask.device) >= counts[:, None], -1)


def pick_order(rank: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The kept indices of each row by ascending ``rank`` (ties to the lower index), padded with ``-1``.

    Args:
        rank: ``(B, n)``: when each token was picked (lower = earlier); a scorer's is minus its score.
        kept: ``(B, n)`` bool.

    Returns:
        ``(B, K)`` long, ``K`` the largest row count.
    """
    by_rank = torch.argsort(rank.float(), dim=1, stable=True)
    # Then the kept ones first (a stable sort keeps the rank order among them).
    order = by_rank.gather(1, torch.argsort((~kept).gather(1, by_rank).to(torch.uint8), dim=1, stable=True))
    counts = kept.sum(dim=1, keepdim=True)
    width = int(counts.max()) if kept.numel() else 0
    return order[:, :width].masked_fill(torch.arange(width, device=kept.device) >= counts, -1)
