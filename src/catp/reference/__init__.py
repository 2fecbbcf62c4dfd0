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

from catp.models import load_model

__all__ = ["load", "reference_adapter_path", "reference_model_path", "shipped_adapter"]

_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
_ADAPTER = Path(__file__).resolve().parent / "adapter"


def reference_adapter_path() -> Path:
    """Directory of the adapter shipped for the reference model (``catp adapt``; a peft adapter directory).

    Raises:
        FileNotFoundError: this install has no adapter.
    """
    if not (_ADAPTER / "adapter_config.json").is_file():
        raise FileNotFoundError(f"the reference model's adapter is missing from {_ADAPTER}; train one with catp adapt")
    return _ADAPTER


def shipped_adapter() -> Path | None:
    """:func:`reference_adapter_path`, or ``None`` where this install has none."""
    try:
        return reference_adapter_path()
    except FileNotFoundError:
        return None


def reference_model_path() -> Path:
    """Directory of the shipped reference checkpoint (loadable with ``from_pretrained``)."""
    if not (_CHECKPOINT / "config.json").is_file():
        raise FileNotFoundError(f"the reference checkpoint is missing from {_CHECKPOINT}; reinstall catp, or train one from a checkout of the repository with `python -m lab.train --out DIR`")
    return _CHECKPOINT


def load(model: str | Path | None = None, dtype: str = "auto", device: str = "cpu",
         adapter: str | Path | None = None) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a local path or hub id; the reference model by default.

    The same loader as every command's (:func:`catp.models.load_model`).

    Args:
        model: a checkpoint directory or hub id; ``None`` for :func:`reference_model_path`.
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        adapter: a ``catp adapt`` adapter directory, merged into the model
            (:func:`reference_adapter_path` is the one shipped for the reference model).

    Returns:
        ``(model in eval mode, processor)``. The model class follows the config
        (``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration`` /
        ``InstructBlipVideoForConditionalGeneration``; the stock video processor needs torchvision).
    """
    if model is not None and not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a path or hub id, got {type(model).__name__}")
    return load_model(reference_model_path() if model is None else model, dtype=dtype, device=device, adapter=adapter)
