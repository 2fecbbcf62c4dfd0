"""The model families catp prunes, one module each, registered in :data:`FAMILIES`.

Adding a family is one new module with a :class:`~catp.families.base.Family` object, and one
entry in :data:`FAMILIES`; model loading (:mod:`catp.models`), the Hugging Face hooks
(:mod:`catp.hf`) and the vLLM plugin (:mod:`catp.vllm`) read every family fact from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from catp.families.base import Family
from catp.families.aria import ARIA
from catp.families.blip2 import BLIP2
from catp.families.idefics2 import IDEFICS2
from catp.families.kosmos2 import KOSMOS2

__all__ = ["FAMILIES", "Family", "MODEL_TYPES", "check_family", "family_of", "family_of_type", "num_queries", "supported_classes"]

#: Every supported family, in the order messages list them.
FAMILIES: tuple[Family, ...] = (BLIP2, IDEFICS2, KOSMOS2, ARIA)

#: ``config.model_type`` -> the transformers class catp prunes, over all families.
MODEL_TYPES: dict[str, str] = {t: c for family in FAMILIES for t, c in family.model_classes.items()}


def supported_classes() -> str:
    """The supported transformers classes, comma-separated, for messages."""
    return ", ".join(MODEL_TYPES.values())


def family_of_type(model_type: Any) -> Family:
    """The family of a ``config.model_type``.

    Raises:
        ValueError: a model type no family prunes, with the supported classes named.
    """
    for family in FAMILIES:
        if model_type in family.model_classes:
            return family
    raise ValueError(f"a {model_type!r} model has no Q-Former or other cross-attention connector that catp prunes; "
                     f"catp supports {', '.join(MODEL_TYPES)} models ({supported_classes()})")


def family_of(model: nn.Module) -> Family:
    """The family of a transformers model (by its class).

    Raises:
        TypeError: not a torch module.
        ValueError: a model of no supported family, with the supported classes named.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    for family in FAMILIES:
        if family.recognises(model):
            return family
    raise ValueError(f"{type(model).__name__} has no Q-Former or other cross-attention connector that catp prunes; "
                     f"catp supports {supported_classes()}")


def num_queries(config: Any) -> int:
    """``Q`` of a model of a supported family, from its config: the connector's tokens per image (per frame, per
    crop; the largest where it depends on the resolution)."""
    return family_of_type(config.model_type).num_queries(config)


def check_family(config: Any, runs: Sequence[Family], command: str) -> Family:
    """The family of a model config, where ``command`` runs that family (one of ``runs``).

    Raises:
        ValueError: a model of no supported family (:func:`family_of_type`), or of a family ``command`` does not run
            yet, with the families it runs named.
    """
    family = family_of_type(config.model_type)
    if family.name not in {f.name for f in runs}:
        classes = ", ".join(c for f in runs for c in f.model_classes.values())
        raise ValueError(f"{command} runs {', '.join(f.name for f in runs)} models only so far ({classes}); "
                         f"a {config.model_type!r} model ({MODEL_TYPES[config.model_type]}) is not supported by it yet")
    return family
