"""``--model_args`` of the ``catp`` lmms-eval model, parsed with the command line's parsers.

lmms-eval splits ``--model_args a=1,b=2`` at the commas outside brackets and quotes and turns
each value into a bool, int or float where it reads as one, else keeps the text; ``--batch_size``
and ``--device`` arrive as the constructor's ``batch_size`` and ``device``. :func:`parse_model_args`
takes them as they arrive and returns :class:`Settings`, or raises one :class:`ModelArgsError`
that names the argument and its value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catp.budget import Budget
from catp.cli.options import check_adapter, output_file, parse_keep, parse_options
from catp.methods import method_class, options_of
from catp.models import check_device, resolve_dtype
from catp.protocol import check_prompt

__all__ = ["MODEL_ARGS", "ModelArgsError", "Settings", "check", "parse_model_args"]

#: The model's own arguments; any other ``--model_args`` name is a method option.
MODEL_ARGS: tuple[str, ...] = ("pretrained", "method", "keep", "adapter", "dtype", "device", "batch_size", "prompt", "scope",
                               "frames", "cost_file")
#: ``method=none``: the unpruned model.
UNPRUNED = "none"
#: The keep when ``method`` is a method and ``keep`` is not given (``catp serve``'s default too).
DEFAULT_KEEP = 8
#: Frames sampled from a video file for InstructBLIP-Video (the count it was trained with).
DEFAULT_FRAMES = 4


class ModelArgsError(ValueError):
    """A bad ``--model_args`` value; the message names the argument and the value."""


@dataclass(frozen=True)
class Settings:
    """The parsed ``--model_args``.

    Attributes:
        pretrained: a hub id or a model directory (default: the shipped reference model).
        method: a registered name or ``package.module:Class``; ``None`` for ``method=none``.
        keep: a count, a fraction or a :class:`~catp.budget.Budget` (``None`` with ``method=none``).
        options: method options (every ``--model_args`` name outside :data:`MODEL_ARGS`).
        adapter: a ``catp adapt`` adapter directory, merged into the weights.
        dtype: a name of :data:`catp.models.DTYPES` (``auto``: float16 on CUDA, float32 elsewhere).
        device: ``cpu``, ``cuda``, ``cuda:N``; ``None``: this process's accelerate device.
        batch_size: requests per ``generate`` / forward call.
        prompt: the template around each request's context (one ``{}``); ``None``: the model's default.
        scope: ``video`` or ``frame`` for InstructBLIP-Video (``None``: :func:`catp.pruned`'s default).
        frames: frames sampled from a video file.
        cost_file: where the cost summary is also written as JSON (it always goes to the results' ``throughput``).
    """

    pretrained: str
    method: str | None
    keep: int | float | Budget | None
    options: dict[str, Any] = field(default_factory=dict)
    adapter: Path | None = None
    dtype: str = "auto"
    device: str | None = None
    batch_size: int = 1
    prompt: str | None = None
    scope: str | None = None
    frames: int = DEFAULT_FRAMES
    cost_file: Path | None = None

    def resolved_dtype(self, device: str) -> str:
        return resolve_dtype(self.dtype, device)


def _shown(name: str, value: object) -> str:
    return f"{name}={value}"


def check(shown: str, parse: Any, *args: Any) -> Any:
    """``parse(*args)``, its ``ValueError`` / ``TypeError`` turned into a :class:`ModelArgsError` naming ``shown`` (``name=value``)."""
    try:
        return parse(*args)
    except (ValueError, TypeError) as error:
        raise ModelArgsError(f"--model_args {shown}: {error}") from None


def parse_model_args(pretrained: Any = None, method: Any = "catp", keep: Any = None, adapter: Any = None, dtype: Any = "auto",
                     device: Any = None, batch_size: Any = 1, max_batch_size: Any = None, prompt: Any = None, scope: Any = None,
                     frames: Any = DEFAULT_FRAMES, cost_file: Any = None, **options: Any) -> Settings:
    """:class:`Settings` from the constructor's keyword arguments, as lmms-eval passes them.

    Raises:
        ModelArgsError: the first bad argument, named with its value: a keep that is not a count,
            a fraction or a budget (``mass:0.8``), an unknown method or method option, a keep
            given with ``method=none``, a dtype or device torch does not have, an adapter folder
            that peft cannot load, a prompt without exactly one ``{}``, a batch size that is not
            a positive int (lmms-eval's ``auto`` included), ``max_batch_size`` (only with ``auto``).
    """
    if pretrained is None:
        from catp.reference import reference_model_path

        pretrained = str(reference_model_path())
    method_name = str(method).strip()
    chosen = None if method_name == UNPRUNED else check(_shown("method", method), lambda: method_class(method_name).name)
    if chosen is None and keep is not None:
        raise ModelArgsError(f"--model_args {_shown('keep', keep)} would be ignored: method=none runs the unpruned model")
    if chosen is None and options:
        raise ModelArgsError(f"--model_args {', '.join(_shown(k, v) for k, v in options.items())} would be ignored: method=none "
                             f"takes no method options (the model's own arguments: {', '.join(MODEL_ARGS)})")
    keep_value = None if chosen is None else check(_shown("keep", keep), lambda: parse_keep(str(DEFAULT_KEEP if keep is None else keep),
                                                                                    single=True)[0])
    if chosen is not None:
        unknown = sorted(set(options) - set(options_of(method_class(chosen))))
        if unknown:
            takes = ", ".join(options_of(method_class(chosen))) or "no options"
            raise ModelArgsError(f"--model_args {', '.join(_shown(k, options[k]) for k in unknown)}: not an argument of the catp "
                                 f"model ({', '.join(MODEL_ARGS)}) nor an option of method {chosen!r} ({takes})")
    parsed_options = parse_options([f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in options.items()])
    check(_shown("dtype", dtype), resolve_dtype, str(dtype), "cpu")
    if device is not None:
        check(_shown("device", device), check_device, str(device))
    size = _positive_int("batch_size", batch_size)
    if max_batch_size is not None:
        raise ModelArgsError(f"--max_batch_size {max_batch_size} would be ignored: it goes with --batch_size auto, which the catp "
                             "model does not take")
    adapter_path = None if adapter is None else check(_shown("adapter", adapter), check_adapter, Path(str(adapter)))
    template = None if prompt is None else check(_shown("prompt", prompt), check_prompt, str(prompt))
    if scope is not None and str(scope) not in ("video", "frame"):
        raise ModelArgsError(f"--model_args {_shown('scope', scope)}: scope must be video or frame")
    cost_path = None if cost_file is None else check(_shown("cost_file", cost_file), output_file, Path(str(cost_file)))
    return Settings(pretrained=str(pretrained), method=chosen, keep=keep_value, options=parsed_options, adapter=adapter_path,
                    dtype=str(dtype), device=None if device is None else str(device), batch_size=size, prompt=template,
                    scope=None if scope is None else str(scope), frames=_positive_int("frames", frames), cost_file=cost_path)


def _positive_int(name: str, value: Any) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        where = f"--batch_size {value}" if name == "batch_size" else f"--model_args {_shown(name, value)}"
        extra = " (the catp model takes a fixed batch size, not auto)" if text.startswith("auto") else ""
        raise ModelArgsError(f"{where}: {name} must be a positive int{extra}")
    return int(text)

