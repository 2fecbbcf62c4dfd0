"""Pruning methods as small objects with one contract.

A method says what it needs to see of a Q-Former run (:class:`Needs`) and turns what
was captured (:class:`Captures`) into a choice of query tokens, in one of two ways:

* a *scorer* implements :meth:`PruningMethod.score`: ``(rows, num_queries)`` scores,
  the highest are kept;
* a *selector* implements :meth:`PruningMethod.select`: ``(rows, k)`` indices in the
  order it picked them (for greedy selections, where a token's worth depends on what is
  already kept).

:func:`catp.selection.choose` is the one place that turns either into the kept set
(ascending, the order the LLM receives them). A method knows nothing about models or
engines: the integrations (:mod:`catp.hf`, :mod:`catp.vllm`) do the capturing.

A method is one class in one place: :func:`register_method` puts it in the registry under
its ``name``, and its ``kind`` says what it is compared with in reports. Build one by name
with :func:`get_method` (``get_method("catp-layer", layer_weights=[...])``), by import path
(``get_method("my_pkg.module:MyMethod")``), or pass an instance to :func:`catp.pruned`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

import catp.scoring as scoring
from catp.budget import Budget


@dataclass(frozen=True)
class Needs:
    """What a method must see of one vision + connector run (a Q-Former, a perceiver resampler).

    Attributes:
        cross_attention: which cross-attention layers' probabilities: ``"none"``, the ``"last"``, ``"all"``.
        self_attention: the queries' attention to each other (``selfattn``).
        vision_last_block: the last vision block's self-attention (``catp-image``).
        query_output: the connector output before the LLM projection (``l2norm``).
    """

    cross_attention: Literal["none", "last", "all"] = "none"
    self_attention: bool = False
    vision_last_block: bool = False
    query_output: bool = False

    @property
    def eager_connector(self) -> bool:
        """Whether the connector must run eager: attention probabilities are only returned by the eager implementation."""
        return self.cross_attention != "none" or self.self_attention


@dataclass
class Captures:
    """What one vision + connector run exposed (a Q-Former, a perceiver resampler: :mod:`catp.families`).

    A video is captured frame by frame: its ``T`` frames are ``T`` consecutive rows
    (frame-major per sample), each scored as an image is; so are an image's crops.

    Attributes:
        num_queries: ``Q``.
        batch_size: the number of rows: images, or samples x frames.
        num_frames: ``T``, frames per sample (1 for images).
        cross_attentions: captured cross-attention maps over the image tokens, each ``(rows, H, Q, N)``, in layer
            order (only the last one when the method needs only the last).
        self_attentions: the connector's self-attention maps, each ``(rows, H, S, S)`` whose leading
            ``Q x Q`` block is the queries' attention to each other.
        vision_attention: last vision block's self-attention ``(rows, H, N, N)``.
        query_output: connector output for the query tokens before the LLM projection ``(rows, Q, D)``.
        projected: the tokens the LLM receives ``(rows, Q, D_llm)`` (BLIP-2: ``language_projection``'s output).
        image_mask: ``(rows, N)`` bool, ``True`` for a real image token (``None``: all are real);
            padded tokens cast no vote.
        published_layer_weights: whether the paper's layer-importance measurements (``catp-layer``'s
            default weights) are of this connector: BLIP-2's Q-Former.
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
    image_mask: torch.Tensor | None = None
    published_layer_weights: bool = True

    def take_rows(self, rows: torch.Tensor, num_frames: int = 1) -> Captures:
        """The captures of some rows only (``rows``: 1-D indices), ``num_frames`` rows per sample."""
        def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.index_select(0, rows.to(tensor.device))

        return dataclasses.replace(
            self, batch_size=int(rows.numel()), num_frames=num_frames,
            cross_attentions=[take(a) for a in self.cross_attentions], self_attentions=[take(a) for a in self.self_attentions],
            vision_attention=take(self.vision_attention), query_output=take(self.query_output), projected=take(self.projected),
            image_mask=take(self.image_mask),
        )


#: What a method is, which says what reports compare it with: ``"catp"`` (the paper's
#: vote and its variants), ``"baseline"`` (what a method must beat: the paper's baselines
#: and the simple references), ``"selector"`` (greedy selections).
KINDS: tuple[str, ...] = ("catp", "baseline", "selector")
#: The kinds each kind is compared with (paired differences in ``catp eval``'s reports).
COMPARED_WITH: dict[str, tuple[str, ...]] = {"catp": ("baseline",), "baseline": (), "selector": ("catp", "baseline")}


class PruningMethod:
    """Base class: subclasses set ``name``, ``kind`` and ``needs`` and implement :meth:`score` or :meth:`select`.

    Implement exactly one of them; :func:`catp.selection.choose` calls :meth:`select` when a
    subclass overrides it, :meth:`score` otherwise. ``carries_budget``: whether a scorer's
    scores say something about the image, so that a :class:`~catp.budget.Budget` can read a
    per-sample count off them (see :func:`budget_refusal`). Options are the constructor's
    keyword arguments (a dataclass's fields).
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "catp"
    needs: ClassVar[Needs] = Needs()
    carries_budget: ClassVar[bool] = True

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        """Return ``(rows, Q)`` scores; the highest are kept. ``keep_fraction``: the kept share of a group."""
        raise NotImplementedError(f"{type(self).__name__} implements neither score() nor select()")

    def select(self, captures: Captures, k: int) -> torch.Tensor:
        """Return ``(rows, k)`` distinct indices in ``0..Q-1``, in the order they were picked."""
        raise NotImplementedError(f"{type(self).__name__} implements neither score() nor select()")

    @classmethod
    def selects(cls) -> bool:
        """Whether this method picks indices itself (it overrides :meth:`select`) rather than scoring."""
        return cls.select is not PruningMethod.select

    def depends_on_keep(self) -> bool:
        """Whether a scorer's scores change with the kept count (then it is scored once per distinct count)."""
        return False

    def validate(self, num_cross_layers: int, keep: int | None) -> None:
        """Check options against the model and the kept count before anything runs (default: nothing to check).

        ``keep`` is ``None`` where the count is only known per call (a video's ``T*Q``, a Budget).
        Options that need no model are checked by the constructor: a method object that exists
        has options of the right types and ranges."""

    def rows(self) -> int | None:
        """How many rows the options are for (one seed per row), or ``None`` when they fit any batch (default)."""
        return None


_REGISTRY: dict[str, type[PruningMethod]] = {}
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Put a method class in the registry under its ``name`` (usable as a class decorator).

    Registering the same class again does nothing.

    Raises:
        TypeError: not a :class:`PruningMethod` subclass, or it implements neither or both
            of ``score`` and ``select``.
        ValueError: a bad ``name`` or ``kind``, or a name taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
        raise TypeError(f"a method must be a subclass of catp.PruningMethod, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{cls.__name__}.name must be a lower-case name of letters, digits, '.', '_' or '-', got {name!r}")
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {', '.join(KINDS)}, got {cls.kind!r}")
    scores = cls.score is not PruningMethod.score
    if scores == cls.selects():
        raise TypeError(f"{cls.__name__} must implement exactly one of score() and select()")
    if (cls.kind == "selector") != cls.selects():
        raise ValueError(f"{cls.__name__}: kind 'selector' is for methods that implement select(), and only for them")
    taken = _REGISTRY.get(name)
    if taken is not None and taken is not cls:
        raise ValueError(f"method name {name!r} is taken by {taken.__module__}.{taken.__qualname__}")
    _REGISTRY[name] = cls
    return cls


class _Names(Sequence):
    """A live, read-only view of registered method names (a method registered later appears in it)."""

    def __init__(self, selectors_only: bool = False) -> None:
        self._selectors_only = selectors_only

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, cls in _REGISTRY.items() if not self._selectors_only or cls.selects())

    def __getitem__(self, index):  # type: ignore[override]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return repr(self._names())


#: Every registered method name, as accepted by ``method=`` (a live view of the registry).
METHODS: Sequence[str] = _Names()
#: The registered methods that select (:meth:`PruningMethod.select`) rather than score.
SELECTORS: Sequence[str] = _Names(selectors_only=True)


@register_method
@dataclass
class CATP(PruningMethod):
    """Rank vote on the last cross-attention layer (the paper's main method)."""

    name: ClassVar[str] = "catp"
    needs: ClassVar[Needs] = Needs(cross_attention="last")

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        return scoring.catp_scores(captures.cross_attentions, captures.image_mask)


@register_method
@dataclass
class CATPAll(PruningMethod):
    """Probabilities summed over all cross-attention layers, then one vote."""

    name: ClassVar[str] = "catp-all"
    needs: ClassVar[Needs] = Needs(cross_attention="all")

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        return scoring.catp_all_scores(captures.cross_attentions, captures.image_mask)


@register_method
@dataclass
class CATPLayer(PruningMethod):
    """Per-layer votes weighted by layer importance.

    Args:
        layer_weights: one non-negative weight per cross-attention layer. Default: the
            authors' single-layer accuracies (scoring.PAPER_LAYER_ACCURACY) for the keep fraction nearest the
            requested one, when the Q-Former has 6 cross-attention layers; equal weights
            (with a warning) otherwise.
    """

    name: ClassVar[str] = "catp-layer"
    needs: ClassVar[Needs] = Needs(cross_attention="all")
    layer_weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if self.layer_weights is not None:
            scoring.check_layer_weights(self.layer_weights)  # types, signs; the length against the model in validate()

    def validate(self, num_cross_layers: int, keep: int | None) -> None:
        if self.layer_weights is not None:
            scoring.check_layer_weights(self.layer_weights, num_cross_layers)

    def depends_on_keep(self) -> bool:
        return self.layer_weights is None  # the default weights follow the keep fraction

    def weights_for(self, num_cross_layers: int, keep_fraction: float, published: bool = True) -> torch.Tensor:
        """The layer weights used for a model with ``num_cross_layers`` at ``keep_fraction``.

        ``published``: whether the paper's measurements are of this connector (BLIP-2's Q-Former,
        :attr:`Captures.published_layer_weights`); where not, equal weights, said in a warning."""
        if self.layer_weights is not None:
            return scoring.check_layer_weights(self.layer_weights, num_cross_layers)
        weights = scoring.default_layer_weights(num_cross_layers, keep_fraction) if published else None
        if weights is None:
            why = (f"no published layer-importance weights for a Q-Former with {num_cross_layers} cross-attention "
                   "layers (the paper's table has 6)") if published else (
                   "the published layer-importance weights are BLIP-2's Q-Former's, not this connector's")
            warnings.warn(f"catp-layer: {why}; using equal weights. Pass layer_weights=[...] to choose.", stacklevel=2)
            weights = torch.full((num_cross_layers,), 1.0 / num_cross_layers)
        return weights

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        weights = self.weights_for(len(captures.cross_attentions), keep_fraction, captures.published_layer_weights)
        return scoring.catp_layer_scores(captures.cross_attentions, weights, captures.image_mask)


@register_method
@dataclass
class CATPImage(PruningMethod):
    """Last-layer vote with each image token's points weighted by its ViT importance."""

    name: ClassVar[str] = "catp-image"
    needs: ClassVar[Needs] = Needs(cross_attention="last", vision_last_block=True)

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        assert captures.vision_attention is not None, "the vision block's attention was not captured"
        weights = scoring.image_token_weights(captures.vision_attention)
        return scoring.catp_image_scores(captures.cross_attentions, weights.to(captures.device), captures.image_mask)


@register_method
@dataclass
class L2Norm(PruningMethod):
    """Baseline: L2 norm of each Q-Former output token (before the projection)."""

    name: ClassVar[str] = "l2norm"
    kind: ClassVar[str] = "baseline"
    needs: ClassVar[Needs] = Needs(query_output=True)

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        assert captures.query_output is not None, "the Q-Former output was not captured"
        return scoring.l2norm_scores(captures.query_output)


@register_method
@dataclass
class SelfAttn(PruningMethod):
    """Baseline (SpAtten-style): attention received in the Q-Former self-attention."""

    name: ClassVar[str] = "selfattn"
    kind: ClassVar[str] = "baseline"
    needs: ClassVar[Needs] = Needs(self_attention=True)

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        return scoring.selfattn_scores(captures.self_attentions, captures.num_queries)


@register_method
@dataclass
class First(PruningMethod):
    """Reference: keep the first ``k`` query tokens.

    Each frame of a video is scored as an image, so over a whole video (ties to the lower
    flat index) it keeps query 0 of every frame, then query 1, and so on.
    """

    name: ClassVar[str] = "first"
    kind: ClassVar[str] = "baseline"
    carries_budget: ClassVar[bool] = False

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        return scoring.first_scores(captures.batch_size, captures.num_queries, device=captures.device)


@register_method
@dataclass
class Random(PruningMethod):
    """Reference: ``k`` tokens drawn at random.

    Args:
        seed: one seed for all rows, or a list of one per row (the eval harness derives one per
            question, so that results do not depend on batching): ints in ``0..2**63-1``.
    """

    name: ClassVar[str] = "random"
    kind: ClassVar[str] = "baseline"
    carries_budget: ClassVar[bool] = False
    seed: int | Sequence[int] = 0

    def __post_init__(self) -> None:
        scoring.check_seeds(self.seed)

    def rows(self) -> int | None:
        return len(self.seed) if isinstance(self.seed, (list, tuple)) else None

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
        if not isinstance(self.features, str) or self.features not in FEATURES:
            raise ValueError(f"{self.name}: features must be one of {', '.join(map(repr, FEATURES))}, got {self.features!r}")

    def tokens(self, captures: Captures) -> torch.Tensor:
        """The ``(B, Q, D)`` tokens to select among."""
        tokens = captures.projected if self.features == "projected" else captures.query_output
        assert tokens is not None, f"the {self.features} tokens were not captured"
        return tokens


@register_method
@dataclass(kw_only=True)
class DivPrune(_OnTokens):
    """Max-min diversity: each pick is the token farthest (cosine) from those kept (DivPrune, CVPR 2025).

    Saeed Ranjbar Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
    Multimodal Models", CVPR 2025 (arXiv 2503.02175). See :func:`catp.scoring.divprune_select`.

    Args:
        features: which tokens to compare (see :data:`FEATURES`).
    """

    name: ClassVar[str] = "divprune"
    kind: ClassVar[str] = "selector"

    def select(self, captures: Captures, k: int) -> torch.Tensor:
        return scoring.divprune_select(self.tokens(captures), k)


@register_method
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
    kind: ClassVar[str] = "selector"
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


@register_method
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
    kind: ClassVar[str] = "selector"
    needs: ClassVar[Needs] = Needs(cross_attention="last")
    lam: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        scoring.check_diversity_weight(self.lam)

    def select(self, captures: Captures, k: int) -> torch.Tensor:
        votes = scoring.catp_scores(captures.cross_attentions, captures.image_mask)
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


def check_runnable(methods: Sequence[str | PruningMethod], keeps: Sequence[int | float | Budget]) -> None:
    """That some method runs at some keep: a count or fraction runs with every method, a
    :class:`~catp.budget.Budget` with the methods that can carry one (:func:`budget_refusal`).

    Raises:
        ValueError: "nothing to run", with why (no method or keep, or only budgets that no method carries).
    """
    resolved = [get_method(m) for m in methods]
    if any(not isinstance(k, Budget) or budget_refusal(m) is None for m in resolved for k in keeps):
        return
    why = "; ".join(filter(None, (budget_refusal(m) for m in resolved))) if keeps else ""
    raise ValueError(f"nothing to run: no method runs at any of the keeps ({why or 'no method or keep given'})")


def method_class(method: str) -> type[PruningMethod]:
    """The class of a registered name, or of an import path ``"package.module:Class"`` (registered on first use).

    Raises:
        ValueError: an unknown name, or a path that does not import or names no method class.
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a name from catp.METHODS or a PruningMethod, got {type(method).__name__}")
    if ":" not in method:
        cls = _REGISTRY.get(method)
        if cls is None:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}, or give package.module:Class")
        return cls
    module_name, _, class_name = method.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"method {method!r}: cannot import module {module_name!r} ({error})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
        raise ValueError(f"method {method!r}: {module_name} has no PruningMethod subclass named {class_name!r}")
    return register_method(cls)


def options_of(cls: type[PruningMethod]) -> list[str]:
    """The options (constructor keyword arguments) a method class takes."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    parameters = inspect.signature(cls).parameters.values()
    return [p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def get_method(method: str | PruningMethod, **options: object) -> PruningMethod:
    """Build a method from its name (or ``"package.module:Class"``) and options, or pass an instance through.

    Raises:
        ValueError: unknown method name.
        TypeError: an option the method does not take (e.g. a misspelt ``layer_weight=``),
            or options given together with a method instance.
    """
    if isinstance(method, PruningMethod):
        if options:
            raise TypeError(f"options {sorted(options)} given with a method instance; set them on the instance")
        return method
    cls = method_class(method)
    valid = options_of(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        takes = ", ".join(sorted(valid)) if valid else "no options"
        raise TypeError(f"method {cls.name!r} got unknown option(s) {', '.join(unknown)}; it takes: {takes}")
    return cls(**options)


def seed_options(method: str, seeds: Sequence[int]) -> dict[str, list[int]]:
    """``{"seed": seeds}`` for a method that takes a ``seed`` option (``random``), else ``{}``: one
    draw per row, so results do not depend on batching, sharding or resuming."""
    return {"seed": list(seeds)} if "seed" in options_of(method_class(method)) else {}


def compared_with(method: str, present: Sequence[str] = (), extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The methods ``method`` is compared with in reports: those of :data:`COMPARED_WITH` its kind,
    in registry order, then ``extra``; ``method`` itself excepted.

    Args:
        present: where given, only these methods (the ones a run measured) are returned.
        extra: more methods compared with every method (``catp eval --compare``).
    """
    cls = _REGISTRY.get(method)
    kinds = COMPARED_WITH[cls.kind] if cls is not None else ()
    built_in = [name for name, other in _REGISTRY.items() if other.kind in kinds]
    names = [b for b in dict.fromkeys([*built_in, *extra]) if b != method]
    return tuple(n for n in names if not present or n in present)
