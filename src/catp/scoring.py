"""Query-token scoring and selection: small pure tensor functions, no model code.

Two kinds of function, matching the two kinds of method (:mod:`catp.methods`):

* every ``*_scores`` function returns a float tensor of shape ``(batch, num_queries)``;
  a higher score means "keep this query token". :func:`catp.selection.choose` turns
  scores into the kept indices.
* every ``*_select`` function returns ``(batch, k)`` indices in the order it picked
  them (greedy selections, where a token's value depends on what was already kept).
  They run on the whole batch at once; the only Python loop is over the ``k`` picks.
  Ties go to the lower index, as in :func:`catp.selection.keep_mask`.

Notation used in the docstrings:

* ``B`` batch, ``H`` heads, ``Q`` query tokens (32 in BLIP-2), ``N`` image tokens
  (257 for ViT-g/14 at 224 px), ``S`` Q-Former sequence length (``Q`` plus the
  instruction tokens for InstructBLIP), ``L`` cross-attention layers, ``D`` width.

The scores follow the CATP paper (arXiv 2404.08567) and its authors' code, with the
image-weight bug fixed (see :func:`catp_image_scores`). The selections follow DivPrune
(CVPR 2025, arXiv 2503.02175) and DART (arXiv 2502.11494), adapted to the Q-Former's query
tokens, plus our own CATP vote with a diversity penalty (:func:`catp_diverse_select`).
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Sequence

import torch

# The authors' single-layer VQAv2 accuracies (keep fraction -> accuracy of cross-attention
# layers 1..6 voting alone), used as the default weights of ``catp-layer``.
PAPER_LAYER_ACCURACY: dict[float, tuple[float, ...]] = {
    1 / 2: (44.17, 39.93, 42.80, 22.34, 27.43, 43.79),
    1 / 4: (35.44, 31.26, 31.51, 16.94, 11.01, 34.66),
    1 / 8: (30.17, 26.46, 18.94, 17.04, 10.48, 23.70),
}


def rank_votes(attn: torch.Tensor) -> torch.Tensor:
    """Rank of every query within each (head, image token) column.

    Args:
        attn: cross-attention probabilities ``(B, H, Q, N)``.

    Returns:
        ``(B, H, Q, N)`` float tensor; entry ``[b, h, q, j]`` is the rank of query ``q``
        among the ``Q`` queries for voter ``(h, j)``: 0 for the smallest probability,
        ``Q - 1`` for the largest. Ties are broken by query index (stable sort).
    """
    if attn.dim() != 4:
        raise ValueError(f"expected cross-attention of shape (batch, heads, queries, image_tokens), got {tuple(attn.shape)}")
    # Sort along a contiguous last axis (faster than sorting along dim 2 in place).
    by_voter = attn.transpose(2, 3).contiguous()  # (B, H, N, Q)
    order = torch.argsort(by_voter, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(attn.shape[2], device=attn.device).expand_as(order)
    # Inverse permutation of `order` (argsort of argsort, in one scatter).
    ranks.scatter_(-1, order, positions)
    return ranks.transpose(2, 3).to(torch.float32)


def vote_scores(attn: torch.Tensor, voter_weights: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of rank points each query gets from all (head, image token) voters.

    Args:
        attn: cross-attention probabilities ``(B, H, Q, N)``.
        voter_weights: optional per-image-token weights ``(B, N)`` multiplying each
            voter's points.
        image_mask: optional ``(B, N)`` bool, ``True`` for a real image token: a padded token
            (probability 0 for every query, so its ranks would follow the query index) casts no vote.

    Returns:
        ``(B, Q)`` scores.
    """
    ranks = rank_votes(attn)
    if voter_weights is not None:
        ranks = ranks * voter_weights.to(ranks.dtype)[:, None, None, :]
    if image_mask is not None:
        if image_mask.shape != (attn.shape[0], attn.shape[-1]):
            raise ValueError(f"image mask of shape {tuple(image_mask.shape)} does not match the cross-attention's "
                             f"(batch, image_tokens) = {(attn.shape[0], attn.shape[-1])}")
        ranks = ranks * image_mask.to(ranks.device, ranks.dtype)[:, None, None, :]
    return ranks.sum(dim=(1, 3))


def catp_scores(cross_attentions: Sequence[torch.Tensor], image_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``catp``: rank vote on the last cross-attention layer. Returns ``(B, Q)``.

    ``image_mask``: optional ``(B, N)`` bool, the real image tokens (see :func:`vote_scores`); the same in every function below.
    """
    _check_layers(cross_attentions)
    return vote_scores(cross_attentions[-1], image_mask=image_mask)


def catp_all_scores(cross_attentions: Sequence[torch.Tensor], image_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``catp-all``: probabilities summed over all cross-attention layers, then one vote.

    Args:
        cross_attentions: ``L`` tensors of shape ``(B, H, Q, N)``.

    Returns:
        ``(B, Q)`` scores.
    """
    _check_layers(cross_attentions)
    summed = torch.stack([a.float() for a in cross_attentions]).sum(dim=0)
    return vote_scores(summed, image_mask=image_mask)


def catp_layer_scores(cross_attentions: Sequence[torch.Tensor], layer_weights: Sequence[float] | torch.Tensor,
                      image_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``catp-layer``: per-layer rank votes, weighted by layer importance.

    ``score(q) = sum_l w_l * sum_h sum_j rank_{l,h,j}(q)``

    Args:
        cross_attentions: ``L`` tensors of shape ``(B, H, Q, N)``.
        layer_weights: ``L`` non-negative weights.

    Returns:
        ``(B, Q)`` scores.
    """
    _check_layers(cross_attentions)
    weights = check_layer_weights(layer_weights, len(cross_attentions))
    total = None
    for w, attn in zip(weights.tolist(), cross_attentions):
        part = w * vote_scores(attn, image_mask=image_mask)
        total = part if total is None else total + part
    return total


def image_token_weights(vision_attn: torch.Tensor) -> torch.Tensor:
    """Importance of each image token from the last vision block.

    Args:
        vision_attn: self-attention probabilities of the last ViT block ``(B, H, N, N)``.

    Returns:
        ``(B, N)``: the attention each token receives, summed over heads and rows,
        normalised to sum 1 per image. The authors L2-normalise; either is a constant
        factor per image, so one image keeps the same tokens. Summing to 1 gives every
        frame of a video the same total vote, so that frames compare fairly.
    """
    if vision_attn.dim() != 4 or vision_attn.shape[-1] != vision_attn.shape[-2]:
        raise ValueError(f"expected vision self-attention of shape (batch, heads, tokens, tokens), got {tuple(vision_attn.shape)}")
    received = vision_attn.float().sum(dim=(1, 2))
    return received / received.sum(dim=-1, keepdim=True)


def catp_image_scores(cross_attentions: Sequence[torch.Tensor], image_weights: torch.Tensor,
                      image_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``catp-image``: the last-layer vote with each image token's points weighted.

    ``score(q) = sum_h sum_j w_j * rank_{last,h,j}(q)``. The weight multiplies the rank
    points, not the probabilities: scaling a column of probabilities by a positive
    constant cannot change a ranking over queries (the no-op in the authors' code).

    Args:
        cross_attentions: ``L`` tensors of shape ``(B, H, Q, N)``.
        image_weights: ``(B, N)`` per-image-token weights (see :func:`image_token_weights`).

    Returns:
        ``(B, Q)`` scores.
    """
    _check_layers(cross_attentions)
    last = cross_attentions[-1]
    if image_weights.shape != (last.shape[0], last.shape[-1]):
        raise ValueError(
            f"image weights of shape {tuple(image_weights.shape)} do not match the cross-attention's "
            f"(batch, image_tokens) = {(last.shape[0], last.shape[-1])}"
        )
    return vote_scores(last, image_weights, image_mask)


def l2norm_scores(query_output: torch.Tensor) -> torch.Tensor:
    """``l2norm`` baseline: L2 norm of each Q-Former output token ``(B, Q, D)`` -> ``(B, Q)``."""
    return torch.linalg.vector_norm(query_output.float(), dim=-1)


def selfattn_scores(self_attentions: Sequence[torch.Tensor], num_queries: int) -> torch.Tensor:
    """``selfattn`` baseline: SpAtten-style cumulative attention received.

    Sums the Q-Former self-attention probabilities over layers, heads and rows,
    restricted to the query block (InstructBLIP also attends to instruction tokens).

    Args:
        self_attentions: one ``(B, H, S, S)`` tensor per Q-Former layer.
        num_queries: ``Q``, the leading query block of the sequence.

    Returns:
        ``(B, Q)`` scores.
    """
    if len(self_attentions) == 0:
        raise ValueError("no Q-Former self-attention maps were captured")
    total = None
    for attn in self_attentions:
        part = attn[:, :, :num_queries, :num_queries].float().sum(dim=(1, 2))
        total = part if total is None else total + part
    return total


def first_scores(batch_size: int, num_queries: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``first`` reference: decreasing scores, so the first ``k`` tokens are kept. ``(B, Q)``."""
    return torch.arange(num_queries, 0, -1, device=device, dtype=torch.float32).expand(batch_size, -1).clone()


#: Short reprs of user values in error messages (a request may send a list of a million entries).
_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxtuple = 8
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = 40
short_repr = _REPR.repr

#: Seeds of the ``random`` method are ints in ``0..MAX_SEED`` (what ``torch.Generator.manual_seed`` takes, signed).
MAX_SEED = 2**63 - 1


def check_seeds(seed: object, batch_size: int | None = None) -> list[int]:
    """Validate a ``random`` seed: an int in ``0..MAX_SEED``, or a non-empty list or tuple of them, one per row.

    Returns one seed per row (``batch_size`` of them; a list's own length when ``batch_size`` is ``None``).

    Raises:
        TypeError: not an int or a list or tuple of ints (a bool, a str, a float, None).
        ValueError: a seed out of range, an empty list, or a list whose length is not ``batch_size``.
    """
    def one(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"random: a seed must be an int, got {type(value).__name__} {short_repr(value)}")
        if not 0 <= value <= MAX_SEED:
            raise ValueError(f"random: seed={short_repr(value)} is out of range; a seed is an int in 0..2**63-1")
        return int(value)

    if isinstance(seed, (list, tuple)):
        if not seed:
            raise ValueError("random: seed=[] is empty; give an int or one int per row")
        seeds = [one(s) for s in seed]
        if batch_size is not None and len(seeds) != batch_size:
            raise ValueError(f"random: got {len(seeds)} seeds for a batch of {batch_size} rows; give one int, or one per row")
        return seeds
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"random: seed must be an int or a list of ints (one per row), got {type(seed).__name__} {short_repr(seed)}")
    return [one(seed)] * (1 if batch_size is None else batch_size)


def random_scores(batch_size: int, num_queries: int, seed: int | Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``random`` reference: seeded uniform scores ``(B, Q)``.

    Args:
        seed: one seed for every row, or one seed per row. Each row draws from its own
            generator, so a row's draw does not depend on batching.
    """
    seeds = check_seeds(seed, batch_size)
    rows = [torch.rand(num_queries, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows).to(device)


def default_layer_weights(num_layers: int, keep_fraction: float) -> torch.Tensor | None:
    """Default ``catp-layer`` weights: the authors' single-layer accuracies.

    Takes the row of :data:`PAPER_LAYER_ACCURACY` whose keep fraction is nearest to
    ``keep_fraction`` in log scale, normalised to sum 1. Returns ``None`` when the model
    does not have the paper's 6 cross-attention layers (the caller picks equal weights).
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep fraction must be in (0, 1], got {keep_fraction}")
    rows = PAPER_LAYER_ACCURACY
    if num_layers != len(next(iter(rows.values()))):
        return None
    nearest = min(rows, key=lambda f: abs(math.log(f) - math.log(keep_fraction)))
    weights = torch.tensor(rows[nearest], dtype=torch.float32)
    return weights / weights.sum()


def check_layer_weights(layer_weights: Sequence[float] | torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
    """Validate user layer weights: a list, tuple or 1-D tensor of ``num_layers`` finite, non-negative numbers,
    not all zero (any length when ``num_layers`` is ``None``: the model is not known yet).

    Raises:
        TypeError: not a list, tuple or tensor of numbers (a bool or a str among them).
        ValueError: the wrong length, a negative or non-finite weight, all zero.
    """
    if isinstance(layer_weights, torch.Tensor):
        if layer_weights.dim() != 1 or layer_weights.is_complex():
            raise ValueError(f"layer_weights must be a 1-D real tensor, got shape {tuple(layer_weights.shape)}")
    elif not isinstance(layer_weights, (list, tuple)) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in layer_weights):
        raise TypeError(f"layer_weights must be a list of numbers, one per cross-attention layer, got {short_repr(layer_weights)}")
    try:
        weights = torch.as_tensor(layer_weights, dtype=torch.float32).flatten()
    except (OverflowError, RuntimeError):
        raise ValueError(f"layer_weights must be finite and non-negative, got {short_repr(layer_weights)}") from None
    if weights.numel() == 0:
        raise ValueError("layer_weights is empty: give one weight per cross-attention layer")
    if num_layers is not None and weights.numel() != num_layers:
        raise ValueError(f"layer_weights has {weights.numel()} entries but the Q-Former has {num_layers} cross-attention layers")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"layer_weights must be finite and non-negative, got {short_repr(weights.tolist())}")
    if weights.sum() <= 0:
        raise ValueError("layer_weights must not all be zero")
    return weights


# -- selections ----------------------------------------------------------------------------


def cosine_similarity_matrix(tokens: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every pair of tokens of each sample.

    Args:
        tokens: ``(B, Q, D)``.

    Returns:
        ``(B, Q, Q)`` float32. A zero vector has similarity 0 to everything. Rounding can
        put entries slightly above 1 (near-duplicates), so callers must not rely on
        ``1 - similarity >= 0``.
    """
    if tokens.dim() != 3:
        raise ValueError(f"expected tokens of shape (batch, num_queries, width), got {tuple(tokens.shape)}")
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def divprune_select(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """``divprune``: greedy max-min diversity on the cosine distance (DivPrune, CVPR 2025).

    With ``d(i, j) = 1 - cos(x_i, x_j)``:

    1. the first pick is the token whose minimum distance to all the other tokens is
       largest (the most isolated token), as the authors start;
    2. each next pick is the not-yet-kept token whose minimum distance to the kept ones is
       largest.

    Kept tokens are masked out explicitly rather than relying on ``d(i, i) = 0``: with
    near-duplicates a distance can be 0 or, after rounding, negative.

    Args:
        tokens: ``(B, Q, D)`` the candidates (by default the ``language_projection``
            outputs, the tokens the LLM receives).
        k: tokens to keep, ``1 <= k <= Q``.

    Returns:
        ``(B, k)`` ``torch.long`` in pick order; ties go to the lower index.
    """
    distance = 1.0 - cosine_similarity_matrix(tokens)
    batch, num_queries = distance.shape[:2]
    _check_k(k, num_queries)
    eye = torch.eye(num_queries, dtype=torch.bool, device=distance.device)
    isolation = distance.masked_fill(eye, math.inf).amin(dim=2)  # (B, Q); +inf when Q == 1 (argmax: 0)
    first = isolation.argmax(dim=1)
    return _greedy(first, k, lambda nearest: nearest, distance, torch.minimum)


def default_dart_pivots(k: int) -> int:
    """``dart``'s default pivot count: ``max(1, round(k / 8))`` (Python rounding, half to even)."""
    return max(1, round(k / 8))


def check_dart_pivots(pivots: int, k: int | None = None) -> int:
    """Validate a pivot count: an int in ``1..k`` (only ``>= 1`` when ``k`` is not known yet)."""
    if isinstance(pivots, bool) or not isinstance(pivots, int):
        raise TypeError(f"dart: pivots must be an int, got {type(pivots).__name__} {pivots!r}")
    if pivots < 1 or (k is not None and pivots > k):
        upper = "k" if k is None else str(k)
        raise ValueError(f"dart: pivots={pivots} is out of range; it must be in 1..{upper} (the tokens kept)")
    return pivots


def dart_select(tokens: torch.Tensor, k: int, pivots: int | None = None) -> torch.Tensor:
    """``dart``: duplication-aware selection (DART, arXiv 2502.11494), adapted to the Q-Former.

    1. ``pivots`` tokens with the largest L2 norm (largest first);
    2. plus the ``k - pivots`` other tokens whose maximum cosine similarity to any pivot is
       smallest (least similar first), i.e. the tokens that duplicate the pivots least.

    How this differs from the paper: DART picks pivots by the norm of their *keys* inside an
    early LLM layer and fills a quota of tokens per pivot. Here no LLM layer has run yet
    (the Q-Former tokens are pruned before the LLM), so pivots are picked by the norm of the
    tokens themselves, and the rest by one global ranking of their similarity to the
    nearest pivot, which always gives exactly ``k`` distinct tokens.

    Args:
        tokens: ``(B, Q, D)`` the candidates (by default the ``language_projection`` outputs).
        k: tokens to keep, ``1 <= k <= Q``.
        pivots: ``1..k``; default :func:`default_dart_pivots` (``max(1, round(k / 8))``).

    Returns:
        ``(B, k)`` ``torch.long`` in pick order: the pivots, then the rest; ties go to the
        lower index.
    """
    similarity = cosine_similarity_matrix(tokens)
    _check_k(k, similarity.shape[1])
    pivots = default_dart_pivots(k) if pivots is None else check_dart_pivots(pivots, k)
    norms = torch.linalg.vector_norm(tokens.float(), dim=-1)  # (B, Q)
    pivot_idx = torch.argsort(norms, dim=1, descending=True, stable=True)[:, :pivots]  # (B, p)
    to_pivots = similarity.gather(2, pivot_idx.unsqueeze(1).expand(-1, similarity.shape[1], -1))  # (B, Q, p)
    duplication = to_pivots.amax(dim=2).scatter(1, pivot_idx, math.inf)  # pivots are already kept: last
    rest = torch.argsort(duplication, dim=1, stable=True)[:, : k - pivots]
    return torch.cat([pivot_idx, rest], dim=1)


def check_diversity_weight(weight: float) -> float:
    """Validate ``catp-diverse``'s λ: a finite number ``>= 0``."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"catp-diverse: lam (λ) must be a number, got {type(weight).__name__} {weight!r}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"catp-diverse: lam (λ) must be finite and >= 0 (0 is plain catp), got {weight}")
    return float(weight)


def catp_diverse_select(votes: torch.Tensor, tokens: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """``catp-diverse`` (ours): the CATP vote with a penalty for duplicating kept tokens.

    Greedy: each step keeps the not-yet-kept token that maximises ``v - λ · c``, where ``v``
    is its vote min-max normalised to [0, 1] per sample (all 0 when every vote is equal) and
    ``c`` is its maximum cosine similarity to the tokens already kept. The first pick has
    no kept token to resemble: it is the top-voted token. ``λ = 0`` picks in vote order,
    so it keeps exactly the set plain ``catp`` keeps on the votes.

    Args:
        votes: ``(B, Q)`` CATP votes (:func:`catp_scores`).
        tokens: ``(B, Q, D)`` the candidates (by default the ``language_projection`` outputs).
        k: tokens to keep, ``1 <= k <= Q``.
        lam: λ ``>= 0``.

    Returns:
        ``(B, k)`` ``torch.long`` in pick order; ties go to the lower index.
    """
    lam = check_diversity_weight(lam)
    similarity = cosine_similarity_matrix(tokens).double()
    if votes.shape != similarity.shape[:2]:
        raise ValueError(f"votes of shape {tuple(votes.shape)} do not match the tokens' (batch, num_queries) {tuple(similarity.shape[:2])}")
    _check_k(k, votes.shape[1])
    # float64: distinct integer votes stay distinct after normalising, so λ = 0 reproduces catp exactly.
    low, high = votes.double().aminmax(dim=1, keepdim=True)
    value = (votes.double() - low) / (high - low).clamp_min(torch.finfo(torch.float64).tiny)
    first = value.argmax(dim=1)
    return _greedy(first, k, lambda closest: value - lam * closest, similarity, torch.maximum)


def _greedy(
    first: torch.Tensor,
    k: int,
    objective: Callable[[torch.Tensor], torch.Tensor],
    pairwise: torch.Tensor,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The loop shared by the greedy selections, batched over samples.

    Keeps ``agg[b, j]``, ``combine`` (min or max) of ``pairwise[b, kept, j]`` over the kept
    tokens, and picks, ``k - 1`` times, the not-yet-kept token with the largest
    ``objective(agg)``. ``argmax`` returns the first maximum: ties go to the lower index.

    Args:
        first: ``(B,)`` the first pick.
        k: total picks.
        objective: ``(B, Q) -> (B, Q)`` value of each candidate given ``agg``.
        pairwise: ``(B, Q, Q)`` distances or similarities.
        combine: ``torch.minimum`` or ``torch.maximum``.

    Returns:
        ``(B, k)`` ``torch.long`` in pick order.
    """
    rows = torch.arange(pairwise.shape[0], device=pairwise.device)
    kept = torch.zeros(pairwise.shape[:2], dtype=torch.bool, device=pairwise.device)
    kept[rows, first] = True
    agg = pairwise[rows, first]
    picks = [first]
    for _ in range(k - 1):
        pick = objective(agg).masked_fill(kept, -math.inf).argmax(dim=1)
        kept[rows, pick] = True
        agg = combine(agg, pairwise[rows, pick])
        picks.append(pick)
    return torch.stack(picks, dim=1)


def _check_k(k: int, num_queries: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_queries:
        raise ValueError(f"k must be an int in 1..{num_queries}, got {k!r}")


def _check_layers(cross_attentions: Sequence[torch.Tensor]) -> None:
    if len(cross_attentions) == 0:
        raise ValueError(
            "no cross-attention probabilities were captured; the Q-Former must run the eager attention "
            "(SDPA returns no probabilities)"
        )
