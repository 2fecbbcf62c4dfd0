"""What both engines capture of a connector run, in one place.

The Hugging Face hooks (:mod:`catp.hf`) and the vLLM model (:mod:`catp.vllm.model`) record a
connector run in a :class:`Recorder` and hand its :class:`~catp.methods.Captures` to the
methods. Shared here:

* :func:`union`: what a batch must capture so that each of its methods gets what it needs;
* :func:`watch`: which modules to hook for given needs (the last cross-attention layer or all
  of them, the self-attention, the last vision block), read from the model's family;
* :func:`attention_probabilities`, :func:`qkv_probabilities`, :func:`linear_fp32`: attention
  probabilities recomputed from projections, for attentions that return none (SDPA) or for
  a vision block that stays on SDPA.

Notation: ``rows`` connector runs (images, frames, crops), ``H`` heads, ``Q`` queries, ``N``
image tokens, ``D`` width.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from catp.methods import Captures, Needs

if TYPE_CHECKING:
    from catp.families.base import Family

__all__ = ["Recorder", "Watch", "attention_probabilities", "layers_for", "linear_fp32", "qkv_probabilities", "union", "watch"]

_LAYER_CHOICES = ("none", "last", "all")
T = TypeVar("T")


def union(needs: Iterable[Needs]) -> Needs:
    """What a batch must capture so that each of its methods gets what it needs."""
    needs = list(needs)
    return Needs(
        cross_attention=max((n.cross_attention for n in needs), key=_LAYER_CHOICES.index, default="none"),
        self_attention=any(n.self_attention for n in needs),
        vision_last_block=any(n.vision_last_block for n in needs),
        query_output=any(n.query_output for n in needs),
    )


def layers_for(layers: Sequence[T], cross_attention: str) -> list[T]:
    """The cross-attention layers (or maps) a ``Needs.cross_attention`` setting reads: none, the last one, or all."""
    if cross_attention not in _LAYER_CHOICES:
        raise ValueError(f"cross_attention must be one of {', '.join(_LAYER_CHOICES)}, got {cross_attention!r}")
    return {"none": [], "last": list(layers[-1:]), "all": list(layers)}[cross_attention]


@dataclass(frozen=True)
class Watch:
    """The modules to hook for one set of needs.

    Attributes:
        cross: the connector's cross-attention modules the methods read, in layer order.
        self_attention: the modules whose probabilities ``selfattn`` reads.
        vision: the last vision block's attention (``catp-image``), else ``None``.
        image_mask: the module whose inputs say which image tokens are real, where the vote needs to know
            (:meth:`~catp.families.base.Family.image_mask_module`), else ``None``.
    """

    cross: list[nn.Module]
    self_attention: list[nn.Module]
    vision: nn.Module | None
    image_mask: nn.Module | None = None


def watch(family: Family, model: nn.Module, needs: Needs) -> Watch:
    """Which modules of ``model`` to hook so that methods with ``needs`` get what they read."""
    return Watch(
        cross=layers_for(family.cross_attention_modules(model), needs.cross_attention),
        self_attention=family.self_attention_modules(model) if needs.self_attention else [],
        vision=family.vision_block(model) if needs.vision_last_block else None,
        image_mask=family.image_mask_module(model) if needs.cross_attention != "none" else None,
    )


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in fp32 (the weights cast, not changed).

    A layer an adapter wraps (peft's LoRA, which keeps the original as ``base_layer``) runs as it is and its output
    is cast: its ``weight`` is the base weight alone, without the adapter's update that its forward adds.
    """
    if hasattr(layer, "base_layer"):
        return layer(x).float()
    return nn.functional.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, scale: float,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + mask)`` in fp32, as an eager attention computes it.

    Args:
        query: ``(B, H, S, d)``.
        key: ``(B, H, K, d)``.
        mask: broadcastable to ``(B, H, S, K)``: additive (float), or bool with ``True`` where a
            query may attend; ``None``: no mask.

    Returns:
        ``(B, H, S, K)`` fp32.
    """
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if mask is not None and mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        logits = logits + mask.float()
    return logits.softmax(dim=-1)


def qkv_probabilities(qkv: torch.Tensor, heads: int, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A self-attention's probabilities from its fused ``qkv`` projection output.

    Args:
        qkv: ``(B, N, 3 * heads * d)``: queries, keys, values one after another, each split into heads.
        mask: as in :func:`attention_probabilities`.

    Returns:
        ``(B, heads, N, N)`` fp32.
    """
    batch, tokens = qkv.shape[:2]
    query, key, _ = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return attention_probabilities(query, key, scale, mask)


@dataclass
class Recorder:
    """What one connector run exposed, as an engine's hooks record it.

    Attributes:
        cross: the image columns of each watched cross-attention, ``(rows, H, Q, N)``, in layer order.
        self_attention: the query-to-query block of each self-attention ``selfattn`` reads, ``(rows, H, Q, Q)``.
        vision: the last vision block's probabilities ``(rows, H, N, N)``.
        query_output: the connector output before the LLM projection ``(rows, Q, D)``.
        image_mask: ``(rows, N)`` bool, the real image tokens (``None``: all are real).
    """

    cross: list[torch.Tensor] = field(default_factory=list)
    self_attention: list[torch.Tensor] = field(default_factory=list)
    vision: torch.Tensor | None = None
    query_output: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the previous run."""
        self.cross, self.self_attention, self.vision, self.query_output, self.image_mask = [], [], None, None, None

    def captures(self, needs: Needs, projected: torch.Tensor, num_frames: int = 1,
                 query_output: torch.Tensor | None = None, published_layer_weights: bool = True) -> Captures:
        """The :class:`~catp.methods.Captures` a method with ``needs`` reads (a subset of what was recorded).

        Args:
            projected: the tokens the LLM receives ``(rows, Q, D_llm)``.
            num_frames: groups per sample (``T`` consecutive rows).
            query_output: the connector output before the projection, when the caller has it at hand
                (else the recorded one).
            published_layer_weights: see :attr:`~catp.families.base.Family.published_layer_weights`.
        """
        before = self.query_output if query_output is None else query_output
        return Captures(
            num_queries=projected.shape[1],
            batch_size=projected.shape[0],
            num_frames=num_frames,
            device=projected.device,
            cross_attentions=layers_for(self.cross, needs.cross_attention),
            self_attentions=self.self_attention if needs.self_attention else [],
            vision_attention=self.vision if needs.vision_last_block else None,
            query_output=None if before is None else before.detach(),
            projected=projected.detach(),
            image_mask=self.image_mask,
            published_layer_weights=published_layer_weights,
        )
