"""Pruning methods as small objects with one contract.

A method says what it needs to see of a Q-Former run (:class:`Needs`) and turns what
was captured (:class:`Captures`) into scores of shape ``(batch, num_queries)``. It knows
nothing about models or hooks; :mod:`catp.pruning` does the capturing.

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
    "Captures",
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

    Attributes:
        num_queries: ``Q``.
        batch_size: ``B``.
        cross_attentions: captured cross-attention maps, each ``(B, H, Q, N)``, in layer order
            (only the last one when the method needs only the last).
        self_attentions: Q-Former self-attention maps, each ``(B, H, S, S)``.
        vision_attention: last vision block's self-attention ``(B, H, N, N)``.
        query_output: Q-Former output for the query tokens ``(B, Q, D)``.
        device: where scores should live.
    """

    num_queries: int
    batch_size: int
    device: torch.device
    cross_attentions: list[torch.Tensor] = field(default_factory=list)
    self_attentions: list[torch.Tensor] = field(default_factory=list)
    vision_attention: torch.Tensor | None = None
    query_output: torch.Tensor | None = None


class PruningMethod:
    """Base class: subclasses set ``name`` and ``needs`` and implement :meth:`score`."""

    name: ClassVar[str]
    needs: ClassVar[Needs] = Needs()

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        """Return ``(B, Q)`` scores; the highest ``k`` are kept."""
        raise NotImplementedError

    def validate(self, num_cross_layers: int) -> None:
        """Check options against the model before anything runs (default: nothing to check)."""


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

    def validate(self, num_cross_layers: int) -> None:
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
    """Reference: keep the first ``k`` query tokens."""

    name: ClassVar[str] = "first"

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
    seed: int | Sequence[int] = 0

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        return scoring.random_scores(captures.batch_size, captures.num_queries, self.seed, device=captures.device)


_REGISTRY: dict[str, type[PruningMethod]] = {
    cls.name: cls for cls in (CATP, CATPAll, CATPLayer, CATPImage, L2Norm, SelfAttn, First, Random)
}

#: Every method name, as accepted by ``method=``.
METHODS: tuple[str, ...] = tuple(_REGISTRY)


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
