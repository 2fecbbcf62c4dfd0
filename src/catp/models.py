"""Loading the models catp prunes (:mod:`catp.families`): the one place for the model classes, the dtype names and
the loader every command uses.

``load_model("Salesforce/blip2-opt-2.7b", dtype="float16", device="cuda")`` is
``from_pretrained`` of the class the config names, plus the processor settings that
batched generation needs. transformers is imported on first use, not with ``import catp``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from catp.extras import import_extra
from catp.families import MODEL_TYPES, family_of, family_of_type

__all__ = ["ADAPTER_SETTINGS_FILE", "DTYPES", "MODEL_TYPES", "QUERY_TOKENS_FILE", "QUERY_TOKENS_KEY", "adapter_info", "check_adapter_dir", "check_device",
           "dtype_bytes", "load_adapter", "load_config", "load_model", "model_class", "resolve_dtype"]

#: The learned queries of a ``catp adapt`` adapter, beside peft's adapter files (one tensor, :data:`QUERY_TOKENS_KEY`, of the
#: shape of the family's parameter: :meth:`catp.families.base.Family.learned_queries`).
QUERY_TOKENS_FILE = "query_tokens.safetensors"
#: The name of that tensor, whatever the family calls its queries (BLIP-2's ``query_tokens``, Idefics2's ``latents``, ...).
QUERY_TOKENS_KEY = "query_tokens"
#: A ``catp adapt`` adapter's settings, its training data and its validation figures.
ADAPTER_SETTINGS_FILE = "catp_adapter.json"
#: The dtype names every command takes (``auto``: float16 on CUDA, float32 otherwise).
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")


def model_class(model_type: str) -> Any:
    """The transformers class for a ``config.model_type`` of a supported family (:data:`MODEL_TYPES`,
    read from :mod:`catp.families`).

    Raises:
        ValueError: a model type catp does not prune, with the supported classes named.
    """
    family_of_type(model_type)
    import transformers

    return getattr(transformers, MODEL_TYPES[model_type])


def resolve_dtype(dtype: str, device: str, default: str = "float32") -> str:
    """A name of :data:`DTYPES` as a torch dtype name; ``auto`` is float16 on CUDA and ``default`` elsewhere.

    Raises:
        ValueError: a name outside :data:`DTYPES`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else default
    return dtype


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a resolved dtype name (``float32``: 4, ``float16`` / ``bfloat16``: 2)."""
    if dtype not in DTYPES or dtype == "auto":
        raise ValueError(f"dtype must be one of {', '.join(DTYPES[1:])}, got {dtype!r}")
    return 4 if dtype == "float32" else 2


def check_device(device: str) -> str:
    """Raise a ``ValueError`` unless ``device`` names a device torch has here (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N (a torch device), got {device!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__})")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu" and parsed.type != "mps":
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return device


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else with a slash, or a leading ./ ~ /, is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or "\\" in name


def load_config(name: str | Path) -> Any:
    """The config of a model directory or hub id, checked to be of a supported family.

    Raises:
        ValueError: no such directory, a directory without a model, a hub id that cannot be
            had, or a model of another type (with its type named).
    """
    from transformers import AutoConfig

    source = str(name)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{source} is not a model directory: it has no config.json")
    elif _looks_like_path(source):
        raise ValueError(f"{source}: no such directory")
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else source)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load model {source!r}: not a local directory, and the hub could not provide it ({first})") from None
    model_class(config.model_type)  # a BERT or LLaMA config fails here, with its type named
    family_of_type(config.model_type).check_transformers()
    return config


def load_model(name: str | Path, dtype: str = "auto", device: str = "cpu", adapter: str | Path | None = None) -> tuple[Any, Any]:
    """``(model in eval mode on device, processor)`` from a local directory or a hub id.

    Args:
        name: a checkpoint directory or hub id (the shipped reference model:
            :func:`catp.reference_model_path`).
        dtype: a name of :data:`DTYPES`.
        device: ``cpu``, ``cuda``, ``cuda:N``.
        adapter: a ``catp adapt`` adapter directory to put on the model, merged into its weights
            (:func:`catp.adapt.load_adapter`).

    The processor pads on the left for a decoder-only LLM (generation continues at the
    right end).

    Raises:
        ValueError: see :func:`load_config`, :func:`resolve_dtype`, :func:`check_device`.
    """
    from transformers import AutoProcessor

    dtype = resolve_dtype(dtype, check_device(device))
    config = load_config(name)
    model = model_class(config.model_type).from_pretrained(str(name), dtype=getattr(torch, dtype)).to(device).eval()
    if adapter is not None:
        model = load_adapter(model, adapter, merge=True)
    family = family_of_type(config.model_type)
    processor = family.prepare_processor(AutoProcessor.from_pretrained(str(name)))
    if family.decoder_only(model):
        processor.tokenizer.padding_side = "left"
    return model, processor


def load_adapter(model: nn.Module, path: str | Path, merge: bool = False) -> nn.Module:
    """Put a saved adapter (:func:`save_adapter`) on ``model``: its LoRA weights, the modules it trains whole (BLIP-2's projection) and the learned queries (any family).

    Args:
        merge: fold the LoRA weights into the base weights and return the plain transformers
            model (what the command line's ``--adapter`` does); else the ``PeftModel``.

    Raises:
        ValueError: not an adapter directory, or one for a model of another shape.
    """
    path = check_adapter_dir(path)
    PeftModel = import_extra("peft", "adapt", "an adapter (--adapter, catp.adapt)").PeftModel
    adapted = PeftModel.from_pretrained(model, str(path))
    tokens_file = path / QUERY_TOKENS_FILE
    if tokens_file.is_file():
        tokens = load_file(str(tokens_file))[QUERY_TOKENS_KEY]
        base = adapted.get_base_model()
        target = family_of(base).learned_queries(base)
        if tokens.shape != target.shape:
            raise ValueError(f"{path}: learned queries of shape {tuple(tokens.shape)}, the model's are {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tokens.to(target.dtype))
    adapted.eval()
    return adapted.merge_and_unload() if merge else adapted


def check_adapter_dir(path: str | Path) -> Path:
    """``path`` as a folder that holds an adapter peft can load: an ``adapter_config.json`` that is
    a JSON object with a ``peft_type``.

    Raises:
        ValueError: no such folder, a file, no config, a config that is not JSON or has no ``peft_type``.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such adapter directory")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not an adapter directory (write one with catp adapt)")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not an adapter directory: it has no adapter_config.json (write one with catp adapt)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{config_file} has no 'peft_type': not a peft adapter (write one with catp adapt)")
    return path


def adapter_info(path: str | Path) -> dict[str, Any]:
    """The settings and figures saved with an adapter (:data:`ADAPTER_SETTINGS_FILE`)."""
    file = Path(path) / ADAPTER_SETTINGS_FILE
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
