"""catp: Cross-Attention Token Pruning for BLIP-2-family models on stock transformers.

    import catp
    with catp.pruned(model, method="catp", keep=8):
        out = model.generate(**inputs, max_new_tokens=10)
    with catp.pruned(model, method="catp", keep=catp.Budget(mass=0.8)):   # per-sample k
        out = model.generate(**inputs, max_new_tokens=10)
"""

from catp.budget import Budget
from catp.evaluation.metric import vqa_accuracy
from catp.explain import Explanation, draw_explanation, explain
from catp.methods import METHODS, PruningMethod, get_method
from catp.pruning import PruningSession, pruned, resolve_keep, select_queries
from catp.reference import reference_model_path

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "METHODS",
    "Explanation",
    "draw_explanation",
    "explain",
    "PruningMethod",
    "PruningSession",
    "get_method",
    "pruned",
    "reference_model_path",
    "resolve_keep",
    "select_queries",
    "vqa_accuracy",
]
