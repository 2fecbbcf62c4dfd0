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
from catp.hf import PruningSession, pruned, select_queries
from catp.methods import METHODS, PruningMethod, get_method, register_method
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

#: Loaded on first use, not with ``import catp``: catp.explanation draws with matplotlib, and the
#: reference model and the VQA metric are not needed to prune (the vLLM plugin imports neither).
_LAZY = {
    "Explanation": "catp.explanation",
    "draw_explanation": "catp.explanation",
    "explain": "catp.explanation",
    "reference_adapter_path": "catp.reference",
    "reference_model_path": "catp.reference",
    "vqa_accuracy": "catp.evaluation.metric",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'catp' has no attribute {name!r}")
