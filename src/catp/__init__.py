"""catp: Cross-Attention Token Pruning for BLIP-2-family models on stock transformers.

    import catp
    with catp.pruned(model, method="catp", keep=8):
        out = model.generate(**inputs, max_new_tokens=10)
    with catp.pruned(model, method="catp", keep=catp.Budget(mass=0.8)):   # per-sample k
        out = model.generate(**inputs, max_new_tokens=10)

``import catp`` loads torch and the core (scoring, methods, selection, the Hugging Face
hooks) only; :func:`explain` and :func:`draw_explanation` load their plotting stack on
first use, and the command line (:mod:`catp.cli`) its own.
"""

from typing import Any

from catp.budget import Budget
from catp.evaluation.metric import vqa_accuracy
from catp.hf import PruningSession, pruned, select_queries
from catp.methods import METHODS, PruningMethod, get_method, register_method
from catp.reference import reference_adapter_path, reference_model_path
from catp.selection import choose, resolve_keep

__version__ = "0.2.0"

__all__ = [
    "Budget",
    "METHODS",
    "Explanation",
    "PruningMethod",
    "PruningSession",
    "choose",
    "draw_explanation",
    "explain",
    "get_method",
    "pruned",
    "reference_adapter_path",
    "reference_model_path",
    "register_method",
    "resolve_keep",
    "select_queries",
    "vqa_accuracy",
]

_EXPLAIN = ("Explanation", "draw_explanation", "explain")


def __getattr__(name: str) -> Any:
    # catp.explanation draws with matplotlib: loaded on first use, not with ``import catp``.
    if name in _EXPLAIN:
        import importlib

        return getattr(importlib.import_module("catp.explanation"), name)
    raise AttributeError(f"module 'catp' has no attribute {name!r}")
