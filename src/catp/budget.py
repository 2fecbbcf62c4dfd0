"""Per-sample token budgets: how many query tokens each sample keeps, read off its own scores.

A fixed ``k`` spends the same on an empty image as on a busy one. A :class:`Budget`
decides each sample's ``k`` from that sample's own scores:

* ``Budget(mass=0.8)``: the smallest set of top-scored tokens whose share of the score
  mass *above the uniform level* reaches 80%. The uniform level is the mean score, what
  every token would get if the method spread its mass evenly; the mass above it is
  ``sum_q max(score_q - mean, 0)``. Where no score is above the mean (all equal), ``min``.
* ``Budget(fence=1.5)``: the outliers, scores above ``Q3 + fence * IQR`` (the upper
  Tukey fence, as LLaVA-PruMerge selects its outlier tokens).

Both rules are unchanged by adding a constant to every score or multiplying them all by
a positive one, so they read the same on every scorer. What they mean per method:

* ``catp``, ``catp-all``, ``catp-layer``, ``catp-image``: every voter hands out the same
  points, so each image (each frame) gives out a fixed total and the mean is the fair
  share: ``mass`` keeps the tokens that collect that share of the above-average votes,
  ``fence`` those with an outlying number of votes;
* ``l2norm``: the same on the output norms (a token with an above-average norm carries
  mass);
* ``selfattn``: the same on the attention a query receives in the Q-Former;
* ``first``, ``random``: their scores carry no information about the image, so a budget
  is refused (``ValueError``).

``catp-layer``'s default layer weights depend on the keep fraction; under a budget they are
those of ``max`` over the number of tokens (the keep-1/2 row without ``max``).

The count is then clamped to ``[min, max]`` (``max=None``: every token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Budget", "fence_counts", "mass_counts"]

# Relative slack for the cumulative-mass test: a float cumulative sum can end a hair
# below the total it should reach.
_MASS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Budget:
    """A per-sample token budget: ``keep=catp.Budget(mass=0.8)`` or ``catp.Budget(fence=1.5)``.

    Exactly one rule is given. With ``scope="frame"`` (video) the budget applies to each
    frame's query tokens, otherwise to each sample's.

    Args:
        mass: in ``(0, 1]``: the share of the above-uniform score mass to keep.
        fence: ``>= 0``: keep the scores above ``Q3 + fence * IQR``.
        min: at least this many tokens (``>= 1``); also the count where the rule keeps none.
        max: at most this many (``None``: no bound beyond the number of tokens).
    """

    mass: float | None = None
    fence: float | None = None
    min: int = 1
    max: int | None = None

    def __post_init__(self) -> None:
        if (self.mass is None) == (self.fence is None):
            raise ValueError("a Budget takes exactly one rule: Budget(mass=0.8) or Budget(fence=1.5)")
        for name in ("mass", "fence"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"Budget {name} must be a number, got {type(value).__name__} {value!r}")
        if self.mass is not None and not 0.0 < self.mass <= 1.0:
            raise ValueError(f"Budget mass={self.mass} is out of range: a share in (0, 1]")
        if self.fence is not None and not (math.isfinite(self.fence) and self.fence >= 0):
            raise ValueError(f"Budget fence={self.fence} is out of range: a finite number >= 0 (1.5 is Tukey's)")
        for name in ("min", "max"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"Budget {name} must be an int count, got {type(value).__name__} {value!r}")
        if self.min < 1:
            raise ValueError(f"Budget min={self.min} is out of range: keep at least 1 token")
        if self.max is not None and self.max < self.min:
            raise ValueError(f"Budget max={self.max} is below min={self.min}")

    @property
    def rule(self) -> str:
        return "mass" if self.mass is not None else "fence"

    def __str__(self) -> str:
        """The form :meth:`parse` reads: ``mass:0.8``, ``fence:1.5:min=2:max=16``."""
        text = f"{self.rule}:{self.mass if self.mass is not None else self.fence:g}"
        if self.min != 1:
            text += f":min={self.min}"
        if self.max is not None:
            text += f":max={self.max}"
        return text

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Read ``mass:0.8``, ``fence:1.5``, optionally followed by ``:min=N`` / ``:max=N``."""
        rule, _, rest = text.strip().partition(":")
        parts = rest.split(":") if rest else []
        if rule not in ("mass", "fence") or not parts:
            raise ValueError(f"cannot read budget {text!r}: expected mass:SHARE or fence:FACTOR, then optional :min=N :max=N")
        try:
            value = float(parts[0])
            bounds = {}
            for part in parts[1:]:
                name, eq, number = part.partition("=")
                if name not in ("min", "max") or not eq or name in bounds:
                    raise ValueError(part)
                bounds[name] = int(number)
        except ValueError as error:
            raise ValueError(f"cannot read budget {text!r} ({error}): expected e.g. mass:0.8 or fence:1.5:min=2:max=16") from None
        return cls(**{rule: value}, **bounds)

    def check_tokens(self, n: int) -> None:
        """Raise unless the budget can choose among ``n`` tokens (``min <= n``)."""
        if self.min > n:
            raise ValueError(f"Budget min={self.min} is more than the {n} tokens it chooses from")

    def counts(self, scores: torch.Tensor) -> torch.Tensor:
        """Tokens to keep in each row of ``scores``.

        Args:
            scores: ``(G, n)``: one row per group (a sample, or a frame).

        Returns:
            ``(G,)`` long counts in ``[min, min(max, n)]``.
        """
        n = scores.shape[-1]
        self.check_tokens(n)
        rule = mass_counts(scores, self.mass) if self.mass is not None else fence_counts(scores, float(self.fence))
        return rule.clamp(self.min, n if self.max is None else min(self.max, n))


def mass_counts(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """The ``mass`` rule, unclamped: ``(G, n)`` scores -> ``(G,)`` counts (0 where nothing is above the mean)."""
    s = scores.float()
    excess = (s - s.mean(dim=-1, keepdim=True)).clamp(min=0).sort(dim=-1, descending=True).values
    total = excess.sum(dim=-1, keepdim=True)
    reached = excess.cumsum(dim=-1) >= mass * total * (1 - _MASS_TOLERANCE)
    # The first index where the cumulative excess reaches the target, plus one.
    counts = (~reached).sum(dim=-1) + 1
    return torch.where(total.squeeze(-1) > 0, counts, torch.zeros_like(counts))


def fence_counts(scores: torch.Tensor, fence: float) -> torch.Tensor:
    """The ``fence`` rule, unclamped: how many scores lie above ``Q3 + fence * IQR`` in each row."""
    s = scores.float()
    q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], device=s.device), dim=-1, keepdim=True)
    return (s > q3 + fence * (q3 - q1)).sum(dim=-1)
