"""Pruning methods as small objects with one contract.

A method says what it needs to see of a Q-Former run (:class:`Needs`) and turns what
was captured (:class:`Captures`) into a choice of query tokens, in one of two ways:

* a *scorer* implements :meth:`PruningMethod.score`: ``(batch, num_queries)`` scores,
  the ``k`` highest are kept;
* a *selector* implements :meth:`PruningMethod.select`: ``(batch, k)`` indices in the
  order it picked them (for greedy selections, where a token's worth depends on what is
  already kept).

:func:`choose` is the one place that turns either kind into the kept set (ascending, the
order the LLM receives them). A method knows nothing about models or hooks;
:mod:`catp.pruning` does the capturing.

Build one by name with :func:`get_method` (``get_method("catp-layer", layer_weights=[...])``),
or pass an instance directly to :func:`catp.pruned` / :func:`catp.select_queries`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from catp import scoring

__all__ = [
    "METHODS",
    "SELECTORS",
    "FEATURES",
    "Captures",
    "Choice",
    "Needs",
    "PruningMethod",
    "CATP",
    "CATPAll",
    "CATPLayer",
    "CATPImage",
    "L2Norm",
    "SelfAttn",
    "First",
    "Random",
    "DivPrune",
    "DART",
    "CATPDiverse",
    "budget_refusal",
    "choose",
    "get_method",
]


@dataclass(frozen=True)
class Needs:
    """What a method must see of one vision + Q-Former run."""

    cross_attention: Literal["none", "last", "all"] = "none"
    self_attention: bool = False
    vision_last_block: bool = False
    query_output: bool = False

    @property
    def eager_qformer(self) -> bool:
        """Attention probabilities are only returned by the eager implementation."""
        return self.cross_attention != "none" or self.self_attention


@dataclass
class Captures:
    """What one vision + Q-Former run exposed.

    A video is captured frame by frame: its ``T`` frames are ``T`` consecutive rows
    (frame-major per sample), each scored as an image is.

    Attributes:
        num_queries: ``Q``.
        batch_size: ``B``, the number of rows: images, or samples x frames.
        num_frames: ``T``, frames per sample (1 for images).
        cross_attentions: captured cross-attention maps, each ``(B, H, Q, N)``, in layer order
            (only the last one when the method needs only the last).
        self_attentions: Q-Former self-attention maps, each ``(B, H, S, S)``.
        vision_attention: last vision block's self-attention ``(B, H, N, N)``.
        query_output: Q-Former output for the query tokens ``(B, Q, D)``.
        projected: ``language_projection`` output for the query tokens ``(B, Q, D_llm)``:
            the tokens the LLM receives.
        device: where scores should live.
    """

    num_queries: int
    batch_size: int
    device: torch.device
    num_frames: int = 1
    cross_attentions: list[torch.Tensor] = field(default_factory=list)
    self_attentions: list[torch.Tensor] = field(default_factory=list)
    vision_attention: torch.Tensor | None = None
    query_output: torch.Tensor | None = None
    projected: torch.Tensor | None = None


class PruningMethod:
    """Base class: subclasses set ``name`` and ``needs`` and implement :meth:`score` or :meth:`select`.

    Implement exactly one of them; :func:`choose` calls :meth:`select` when a subclass
    overrides it, :meth:`score` otherwise. ``carries_budget``: whether a scorer's scores say
    something about the image, so that a :class:`~catp.budget.Budget` can read a per-sample
    count off them (see :func:`budget_refusal`).
    """

    name: ClassVar[str]
    needs: ClassVar[Needs] = Needs()
    carries_budget: ClassVar[bool] = True

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        """Return ``(B, Q)`` scores; the highest ``k`` are kept."""
        raise NotImplementedError(f"{type(self).__name__} implements neither score() nor select()")

    def select(self, captures: Captures, k: int) -> torch.Tensor:
        """Return ``(B, k)`` distinct indices in ``0..Q-1``, in the order they were picked."""
        raise NotImplementedError(f"{type(self).__name__} implements neither score() nor select()")

    @classmethod
    def selects(cls) -> bool:
        """Whether this method picks indices itself (it overrides :meth:`select`) rather than scoring."""
        return cls.select is not PruningMethod.select

    def validate(self, num_cross_layers: int, keep: int | None) -> None:
        """Check options against the model and the kept count before anything runs (default: nothing to check).

        ``keep`` is ``None`` where the count is only known per call (a video's ``T*Q``, a Budget)."""


@dataclass(frozen=True)
class Choice:
    """What a method chose for one batch (from :func:`choose`).

    Attributes:
        keep_indices: ``(B, k)`` kept indices, ascending: the order the LLM receives them.
        pick_order: ``(B, k)`` the same indices in the order the method picked them; for
            a scorer, by descending score.
        scores: ``(B, Q)`` scores of a scorer; ``None`` for a selector.
    """

    keep_indices: torch.Tensor
    pick_order: torch.Tensor
    scores: torch.Tensor | None


def choose(method: PruningMethod, captures: Captures, k: int) -> Choice:
    """The one place that turns a method's output into the kept query tokens.

    A scorer's ``(B, Q)`` scores give the ``k`` highest (ties to the lower index); a
    selector's ``(B, k)`` picks are checked (shape, range, no repeats). Either way the
    kept indices are sorted ascending, so kept tokens keep their original relative order.

    Args:
        method: the method.
        captures: what the vision + Q-Former run exposed.
        k: tokens kept per sample, ``1..Q``.

    Returns:
        A :class:`Choice` on ``captures.device``.
    """
    if method.selects():
        order = method.select(captures, k).to(captures.device)
        _check_picks(order, captures, k, method.name)
        scores = None
    else:
        scores = method.score(captures, k / captures.num_queries).to(captures.device)
        if scores.shape != (captures.batch_size, captures.num_queries):
            raise ValueError(f"method {method.name!r} returned scores of shape {tuple(scores.shape)}, "
                             f"expected (batch, num_queries) = {(captures.batch_size, captures.num_queries)}")
        order = scoring.topk_order(scores, k)
    return Choice(keep_indices=order.sort(dim=1).values, pick_order=order, scores=scores)


def _check_picks(order: torch.Tensor, captures: Captures, k: int, name: str) -> None:
    """A selector must return ``(B, k)`` integer indices in ``0..Q-1``, distinct per row."""
    expected = (captures.batch_size, k)
    if order.shape != expected or order.dtype.is_floating_point or order.dtype == torch.bool:
        raise ValueError(f"method {name!r} selected a {order.dtype} tensor of shape {tuple(order.shape)}, "
                         f"expected integer indices of shape (batch, k) = {expected}")
    if order.numel() and (order.min() < 0 or order.max() >= captures.num_queries):
        raise ValueError(f"method {name!r} selected indices outside 0..{captures.num_queries - 1}")
    ascending = order.sort(dim=1).values
    if (ascending[:, 1:] == ascending[:, :-1]).any():
        raise ValueError(f"method {name!r} selected the same query token twice in one sample")


@dataclass
class CATP(PruningMethod):
    """Rank vote on the last cross-attention layer (the paper's main method)."""

    name: ClassVar[str] = "catp"
    needs: ClassVar[Needs] = Needs(cross_attention="last")

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        return scoring.catp_scores(captures.cross_attentions)


@dataclass
class CATPAll(PruningMethod):
    """Probabilities summed over all cross-attention layers, then one vote."""

    name: ClassVar[str] = "catp-all"
    needs: ClassVar[Needs] = Needs(cross_attention="all")

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        return scoring.catp_all_scores(captures.cross_attentions)


@dataclass
class CATPLayer(PruningMethod):
    """Per-layer votes weighted by layer importance.

    Args:
        layer_weights: one non-negative weight per cross-attention layer. Default: the
            authors' single-layer accuracies (SPEC §4) for the keep fraction nearest the
            requested one, when the Q-Former has 6 cross-attention layers; equal weights
            (with a warning) otherwise.
    """

    name: ClassVar[str] = "catp-layer"
    needs: ClassVar[Needs] = Needs(cross_attention="all")
    layer_weights: Sequence[float] | None = None

    def validate(self, num_cross_layers: int, keep: int | None) -> None:
        if self.layer_weights is not None:
            scoring.check_layer_weights(self.layer_weights, num_cross_layers)

    def weights_for(self, num_cross_layers: int, keep_fraction: float) -> torch.Tensor:
        """The layer weights used for a model with ``num_cross_layers`` at ``keep_fraction``."""
        if self.layer_weights is not None:
            return scoring.check_layer_weights(self.layer_weights, num_cross_layers)
        weights = scoring.default_layer_weights(num_cross_layers, keep_fraction)
        if weights is None:
            warnings.warn(
                f"catp-layer: no published layer-importance weights for a Q-Former with {num_cross_layers} "
                "cross-attention layers (the paper's table has 6); using equal weights. Pass layer_weights=[...] to choose.",
                stacklevel=2,
            )
            weights = torch.full((num_cross_layers,), 1.0 / num_cross_layers)
        return weights

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        weights = self.weights_for(len(captures.cross_attentions), keep_fraction)
        return scoring.catp_layer_scores(captures.cross_attentions, weights)


@dataclass
class CATPImage(PruningMethod):
    """Last-layer vote with each image token's points weighted by its ViT importance."""

    name: ClassVar[str] = "catp-image"
    needs: ClassVar[Needs] = Needs(cross_attention="last", vision_last_block=True)

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        assert captures.vision_attention is not None, "the vision block's attention was not captured"
        weights = scoring.image_token_weights(captures.vision_attention)
        return scoring.catp_image_scores(captures.cross_attentions, weights.to(captures.device))


@dataclass
class L2Norm(PruningMethod):
    """Baseline: L2 norm of each Q-Former output token (before the projection)."""

    name: ClassVar[str] = "l2norm"
    needs: ClassVar[Needs] = Needs(query_output=True)

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        assert captures.query_output is not None, "the Q-Former output was not captured"
        return scoring.l2norm_scores(captures.query_output)


@dataclass
class SelfAttn(PruningMethod):
    """Baseline (SpAtten-style): attention received in the Q-Former self-attention."""

    name: ClassVar[str] = "selfattn"
    needs: ClassVar[Needs] = Needs(self_attention=True)

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        return scoring.selfattn_scores(captures.self_attentions, captures.num_queries)


@dataclass
class First(PruningMethod):
    """Reference: keep the first ``k`` query tokens.

    Each frame of a video is scored as an image, so over a whole video (ties to the lower
    flat index) it keeps query 0 of every frame, then query 1, and so on.
    """

    name: ClassVar[str] = "first"
    carries_budget: ClassVar[bool] = False

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        return scoring.first_scores(captures.batch_size, captures.num_queries, device=captures.device)


@dataclass
class Random(PruningMethod):
    """Reference: ``k`` tokens drawn at random.

    Args:
        seed: one seed for all rows, or one per row (the eval harness derives one per
            question, so that results do not depend on batching).
    """

    name: ClassVar[str] = "random"
    carries_budget: ClassVar[bool] = False
    seed: int | Sequence[int] = 0

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        # One draw per sample over all its frames, so that a seed (one per sample) picks
        # different tokens in different frames.
        frames = captures.num_frames
        draws = scoring.random_scores(captures.batch_size // frames, frames * captures.num_queries, self.seed, device=captures.device)
        return draws.reshape(captures.batch_size, captures.num_queries)


#: Which tokens a selector compares: the ``language_projection`` outputs (what the LLM
#: receives, as DivPrune does) or the Q-Former outputs before the projection.
FEATURES: tuple[str, ...] = ("projected", "qformer")


@dataclass(kw_only=True)
class _OnTokens(PruningMethod):
    """Shared option of the selectors that compare tokens with each other.

    Args:
        features: ``"projected"`` (default): the ``language_projection`` outputs, the tokens
            the LLM receives; ``"qformer"``: the Q-Former outputs before the projection.
    """

    features: str = "projected"

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"{self.name}: features must be one of {', '.join(map(repr, FEATURES))}, got {self.features!r}")

    def tokens(self, captures: Captures) -> torch.Tensor:
        """The ``(B, Q, D)`` tokens to select among."""
        tokens = captures.projected if self.features == "projected" else captures.query_output
        assert tokens is not None, f"the {self.features} tokens were not captured"
        return tokens


@dataclass(kw_only=True)
class DivPrune(_OnTokens):
    """Max-min diversity: each pick is the token farthest (cosine) from those kept (DivPrune, CVPR 2025).

    Saeed Ranjbar Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
    Multimodal Models", CVPR 2025 (arXiv 2503.02175). See :func:`catp.scoring.divprune_select`.

    Args:
        features: which tokens to compare (see :data:`FEATURES`).
    """

    name: ClassVar[str] = "divprune"

    def select(self, captures: Captures, k: int) -> torch.Tensor:
        return scoring.divprune_select(self.tokens(captures), k)


@dataclass(kw_only=True)
class DART(_OnTokens):
    """Duplication-aware: highest-norm pivots plus the tokens least similar to any pivot (DART, arXiv 2502.11494).

    Zichen Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More" (arXiv 2502.11494), adapted to the Q-Former: pivots by token
    norm rather than by key norm inside an LLM layer, and one global similarity ranking
    rather than a quota per pivot. See :func:`catp.scoring.dart_select`.

    Args:
        features: which tokens to compare (see :data:`FEATURES`). The Q-Former outputs end
            with a LayerNorm, so with ``"qformer"`` their norms, which pick the pivots, vary little.
        pivots: pivot count in ``1..k``; default ``max(1, round(k / 8))``.
    """

    name: ClassVar[str] = "dart"
    pivots: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pivots is not None:
            scoring.check_dart_pivots(self.pivots)

    def validate(self, num_cross_layers: int, keep: int | None) -> None:
        if self.pivots is not None:
            scoring.check_dart_pivots(self.pivots, keep)

    def select(self, captures: Captures, k: int) -> torch.Tensor:
        return scoring.dart_select(self.tokens(captures), k, self.pivots)


@dataclass(kw_only=True)
class CATPDiverse(_OnTokens):
    """Ours: greedy CATP vote minus λ x similarity to the tokens already kept (λ = 0: plain catp).

    Each step keeps the token maximising ``v - λ · c``: ``v`` its last-layer CATP vote
    (arXiv 2404.08567) min-max normalised per sample, ``c`` its maximum cosine similarity to
    the tokens already kept. See :func:`catp.scoring.catp_diverse_select`.

    Args:
        lam: λ ``>= 0``, the weight of the duplication penalty (votes and similarities
            are both on unit scales). Default 1.
        features: which tokens to compare (see :data:`FEATURES`).
    """

    name: ClassVar[str] = "catp-diverse"
    needs: ClassVar[Needs] = Needs(cross_attention="last")
    lam: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        scoring.check_diversity_weight(self.lam)

    def select(self, captures: Captures, k: int) -> torch.Tensor:
        votes = scoring.catp_scores(captures.cross_attentions)
        return scoring.catp_diverse_select(votes, self.tokens(captures), k, self.lam)


def budget_refusal(method: PruningMethod) -> str | None:
    """Why ``method`` cannot take a :class:`~catp.budget.Budget` (a per-sample count read off its
    scores), or ``None`` when it can."""
    if method.selects():
        return (f"method {method.name!r} is a selector: it picks a fixed number of tokens itself and has no scores "
                "for a Budget to read; give it a fixed keep")
    if not method.carries_budget:
        return (f"method {method.name!r} cannot carry a Budget: its scores say nothing about the image; "
                "give it a fixed keep, or use a scoring method (catp, l2norm, ...)")
    return None


_REGISTRY: dict[str, type[PruningMethod]] = {
    cls.name: cls
    for cls in (CATP, CATPAll, CATPLayer, CATPImage, L2Norm, SelfAttn, First, Random, DivPrune, DART, CATPDiverse)
}

#: Every method name, as accepted by ``method=``.
METHODS: tuple[str, ...] = tuple(_REGISTRY)
#: The methods that select (:meth:`PruningMethod.select`) rather than score.
SELECTORS: tuple[str, ...] = tuple(name for name, cls in _REGISTRY.items() if cls.selects())


def get_method(method: str | PruningMethod, **options: object) -> PruningMethod:
    """Build a method from its name and options, or pass an instance through.

    Raises:
        ValueError: unknown method name.
        TypeError: an option the method does not take (e.g. a misspelt ``layer_weight=``),
            or options given together with a method instance.
    """
    if isinstance(method, PruningMethod):
        if options:
            raise TypeError(f"options {sorted(options)} given with a method instance; set them on the instance")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name from catp.METHODS or a PruningMethod, got {type(method).__name__}")
    cls = _REGISTRY.get(method)
    if cls is None:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        takes = ", ".join(sorted(valid)) if valid else "no options"
        raise TypeError(f"method {method!r} got unknown option(s) {', '.join(unknown)}; it takes: {takes}")
    return cls(**options)
