"""The embedded reference model: a small BLIP-2 trained from scratch on the CPU.

    import catp
    model, processor = catp.reference.load()          # the shipped checkpoint
    model, processor = catp.reference.load("Salesforce/blip2-opt-2.7b")  # or any other

Data and tasks: :mod:`catp.reference.data`; greedy answers and exact match:
:mod:`catp.reference.evaluate`. The recipe that trains the model, its probes and the floor
checks are in the repository's ``lab/`` folder (run from a checkout, not installed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["reference_model_path", "load"]

_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"


def reference_model_path() -> Path:
    """Directory of the shipped reference checkpoint (loadable with ``from_pretrained``)."""
    if not (_CHECKPOINT / "config.json").is_file():
        raise FileNotFoundError(f"the reference checkpoint is missing from {_CHECKPOINT}; reinstall catp or run `catp train-reference --out DIR`")
    return _CHECKPOINT


def load(model: str | Path | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a local path or hub id; the reference model by default.

    Args:
        model: a checkpoint directory or hub id; ``None`` for :func:`reference_model_path`.
        **kwargs: passed to ``from_pretrained`` of the model (e.g. ``dtype=``).

    Returns:
        ``(model in eval mode, processor)``. The model class follows the config
        (``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration`` /
        ``InstructBlipVideoForConditionalGeneration``; the stock video processor needs torchvision).
    """
    if model is not None and not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a path or hub id, got {type(model).__name__}")
    from transformers import AutoConfig, AutoProcessor

    from catp.bench.archs import model_class

    source = str(reference_model_path() if model is None else model)
    config = AutoConfig.from_pretrained(source)
    try:
        cls = model_class(config.model_type)
    except ValueError:
        raise ValueError(f"{source} is a {config.model_type!r} model; catp supports BLIP-2, InstructBLIP and InstructBLIP-Video") from None
    loaded = cls.from_pretrained(source, **kwargs).eval()
    return loaded, AutoProcessor.from_pretrained(source)
