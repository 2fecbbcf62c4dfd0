"""vLLM's BLIP-2 and Aria with query-token pruning: the processors, the models and the captures.

Imports vLLM; :mod:`catp.vllm.plugin` registers each family's class under its
:attr:`~catp.families.base.Family.vllm_architecture` (:class:`CatpBlip2ForConditionalGeneration`,
:data:`catp.vllm.ARCHITECTURE`; :class:`CatpAriaForConditionalGeneration`). Nothing of vLLM is
forked: the classes subclass vLLM's own ones (through the mixins :class:`CatpProcessingInfo`,
:class:`CatpProcessor` and :class:`CatpModel`, which hold everything the families share) and change only

* the processor (front-end process): each request's settings (:meth:`Settings.with_request`)
  are checked, the prompt gets ``k`` image placeholders instead of ``Q`` (the family's own prompt update), and each image's
  :class:`~catp.vllm.ImageRequest` rides along as the multimodal field ``catp``;
* the model (engine core process): :meth:`~CatpModel.embed_multimodal`
  runs vLLM's own vision tower, connector and projection under hooks that
  capture what the methods need (:class:`ConnectorCapture`, with :mod:`catp.capture` and the
  model's family, :mod:`catp.families`), hands them to the same method
  objects and :func:`choose` as the Hugging Face path, and returns each image's kept rows in
  ascending order. Images that keep all ``Q`` tokens take the stock path, unscored.

Every check that can fail on user input runs in the front end (the processor and
:class:`CatpBlip2Config`, when the engine is built): an exception inside the engine core
would stop the engine, not just the request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.aria import (
    AriaDummyInputsBuilder,
    AriaForConditionalGeneration,
    AriaMultiModalProcessor,
    AriaProcessingInfo,
)
from vllm.model_executor.models.blip2 import (
    Blip2DummyInputsBuilder,
    Blip2ForConditionalGeneration,
    Blip2MultiModalProcessor,
    Blip2ProcessingInfo,
)
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItem, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptIndexTargets, PromptInsertion, PromptReplacement, PromptUpdate

from catp.capture import Recorder, union, watch
from catp.families import Family
from catp.methods import Captures, Needs, PruningMethod
from catp.selection import choose
from catp.vllm import (
    REQUEST_KEYS,
    ImageRequest,
    Settings,
    check_engine,
    check_served,
    engine_settings,
    image_tag,
    recording,
    served_family,
)

__all__ = [
    "CatpAriaForConditionalGeneration",
    "CatpAriaMultiModalProcessor",
    "CatpAriaProcessingInfo",
    "CatpBlip2Config",
    "CatpBlip2ForConditionalGeneration",
    "CatpBlip2MultiModalProcessor",
    "CatpBlip2ProcessingInfo",
    "CatpModel",
    "CatpProcessingInfo",
    "CatpProcessor",
    "ConnectorCapture",
]

#: The multimodal field that carries each image's :class:`ImageRequest` (JSON bytes, uint8).
FIELD = "catp"
#: Where the engine's tensor-parallel size is kept for the processor (which sees only the model config).
_TP_KEY = "catp_tensor_parallel_size"


class CatpBlip2Config(VerifyAndUpdateConfig):
    """Checks the engine's settings in the front end, when the engine's config is built.

    vLLM calls it for each family's architecture (``MODELS_CONFIG_MAP``) in the process
    that builds the engine, so a bad ``hf_overrides`` fails ``LLM(...)`` / the server (``catp serve``) at
    once with the message, before the engine core starts.
    """

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        hf_config = vllm_config.model_config.hf_config
        tp = int(vllm_config.parallel_config.tensor_parallel_size)
        check_engine(hf_config, tp)
        setattr(hf_config, _TP_KEY, tp)


class CatpProcessingInfo:
    """Mixed into a family's vLLM processing info: each request's kept count as its image token count."""

    def catp_request(self, mm_processor_kwargs: Mapping[str, object] | None = None) -> tuple[Settings, int]:
        """A request's settings (the engine's, overridden by its ``mm_processor_kwargs``), checked; and its count.

        A request may set only the catp keys (and keys the engine's own ``mm_processor_kwargs`` set):
        ``--trust-request-mm-kwargs`` would otherwise let it pass any option to the image processor,
        whose output (pixel values of another size) the engine process would fail on.
        """
        config = self.get_hf_config()
        request = mm_processor_kwargs or {}
        engine_keys = set(self.ctx.model_config.get_multimodal_config().mm_processor_kwargs or {})
        foreign = sorted(str(key) for key in request if key not in REQUEST_KEYS and key not in engine_keys)
        if foreign:
            raise ValueError(f"mm_processor_kwargs {', '.join(map(repr, foreign))}: this engine takes only "
                             f"{', '.join(REQUEST_KEYS)} per request")
        merged = self.ctx.get_merged_mm_kwargs(request)  # + the engine's mm_processor_kwargs
        settings = engine_settings(config).with_request(merged)
        return settings, check_served(settings, config, int(getattr(config, _TP_KEY, 1)))

    def get_num_image_tokens(self, mm_processor_kwargs: Mapping[str, object] | None = None) -> int:
        return self.catp_request(mm_processor_kwargs)[1]

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # A request may keep up to all Q tokens, whatever the engine's default.
        config = self.get_hf_config()
        return {"image": served_family(config.model_type).num_queries(config)}


class CatpProcessor:
    """Mixed into a family's vLLM processor: each image's request for the engine (the family's class
    puts ``k`` placeholders per image in its ``_get_prompt_updates``)."""

    info: CatpProcessingInfo

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        # The HF processor does not know the catp keys.
        return super()._call_hf_processor(hf_data, {k: v for k, v in hf_kwargs.items() if not k.startswith("catp")})

    def _postprocess_hf_mm_data(self, mm_inputs: Mapping[str, object], hf_processor_mm_kwargs: Mapping[str, object],
                                processed_data: BatchFeature) -> BatchFeature:
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        settings, k = self.info.catp_request(hf_processor_mm_kwargs)
        config = self.info.get_hf_config()
        q = served_family(config.model_type).num_queries(config)
        embeds = processed_data.get("image_embeds")
        if embeds is not None and k != q:
            raise ValueError(f"precomputed image_embeds skip the connector, so catp cannot prune them: they need keep={q} "
                             f"(this request keeps {k})")
        pixels = processed_data.get("pixel_values")
        images = mm_inputs.get("images")
        count = len(pixels if pixels is not None else embeds if embeds is not None else [])
        tags: Sequence[str | None] = [None] * count
        if recording() is not None and isinstance(images, Sequence) and len(images) == count:
            tags = [image_tag(image) for image in images]
        requests = [ImageRequest(settings.method, dict(settings.options), k, tag).encode() for tag in tags]
        width = max((len(r) for r in requests), default=0)
        # One row per image, zero-padded (a JSON text has no NUL byte).
        processed_data[FIELD] = torch.tensor([list(r.ljust(width, b"\0")) for r in requests], dtype=torch.uint8).reshape(count, width)
        return processed_data



class CatpBlip2ProcessingInfo(CatpProcessingInfo, Blip2ProcessingInfo):
    """BLIP-2's processing info, with each request's kept count as its image token count."""


class CatpBlip2MultiModalProcessor(CatpProcessor, Blip2MultiModalProcessor):
    """BLIP-2's processor: ``k`` placeholders at the start of the prompt, and each image's request for the engine."""

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_tokenizer().get_vocab()["<image>"]
        k = self.info.get_num_image_tokens(hf_processor_mm_kwargs)
        return [PromptInsertion(modality="image", target=PromptIndexTargets.start(), insertion=[image_token_id] * k)]


class CatpAriaProcessingInfo(CatpProcessingInfo, AriaProcessingInfo):
    """Aria's processing info, with each request's kept count as its image token count (vLLM's Aria gives
    every image the largest ``Q``, :meth:`~catp.families.aria.AriaFamily.num_queries`)."""


class CatpAriaMultiModalProcessor(CatpProcessor, AriaMultiModalProcessor):
    """Aria's processor: each ``<|img|>`` becomes ``k`` of them, and each image's request for the engine."""

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index
        k = self.info.get_num_image_tokens(hf_processor_mm_kwargs)
        return [PromptReplacement(modality="image", target=[image_token_id], replacement=[image_token_id] * k)]


def _decode_requests(data: torch.Tensor | Sequence[torch.Tensor]) -> list[ImageRequest]:
    """The ``catp`` field of a batch of images back into their requests."""
    rows = data.unbind(0) if isinstance(data, torch.Tensor) else data
    return [ImageRequest.decode(bytes(row.flatten().tolist()).rstrip(b"\0")) for row in rows]


@dataclass
class ConnectorCapture:
    """Forward pre-hooks that record, during one stock vision + connector + projection run,
    what methods with ``needs`` read, as the Hugging Face path captures it.

    vLLM's connector attention returns no probabilities: they are recomputed in fp32 from the
    inputs of the modules a method needs (:func:`catp.capture.watch`,
    :meth:`~catp.families.base.Family.recomputed_probabilities`). ``catp-image``'s last vision
    block is recomputed likewise (tensor-parallel size 1: all heads on this rank). Padded image
    tokens are read off the family's :meth:`~catp.families.base.Family.image_mask_module`. The stock
    computation is not changed.

    Use as a context manager around the run; then :meth:`captures`.
    """

    model: nn.Module
    family: Family
    needs: Needs
    recorder: Recorder = field(default_factory=Recorder)
    _handles: list[Any] = field(default_factory=list)

    def __enter__(self) -> ConnectorCapture:
        watched = watch(self.family, self.model, self.needs)
        for module in watched.cross:
            self._register(module, self._on_connector_attention(self.recorder.cross, self.family.image_probabilities))
        for module in watched.self_attention:
            q = self.family.num_queries(self.model.config)
            self._register(module, self._on_connector_attention(
                self.recorder.self_attention, lambda probs: self.family.latent_probabilities(probs, q)))
        if watched.vision is not None:
            self._register(watched.vision, self._on_vision_attention)
        if watched.image_mask is not None:
            self._register(watched.image_mask, self._on_image_mask)
        query_output = self.family.query_output_module(self.model)
        if query_output is None:
            self._register(self.family.output_module(self.model), self._on_projection)
        else:
            self._handles.append(query_output.register_forward_hook(self._on_query_output))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _register(self, module: nn.Module, hook: Any) -> None:
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    @staticmethod
    def _argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
        return args[position] if len(args) > position else kwargs.get(name)

    def _on_connector_attention(self, into: list[torch.Tensor], part: Any):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            into.append(part(self.family.recomputed_probabilities(module, args, kwargs)))

        return hook

    def _on_vision_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.recorder.vision = self.family.vision_probabilities(module, self._argument(args, kwargs, 0, "hidden_states"),
                                                                self._argument(args, kwargs, 1, "attention_mask"))

    def _on_image_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.recorder.image_mask = self.family.image_mask(args, kwargs)

    def _on_projection(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.recorder.query_output = self._argument(args, kwargs, 0, "input")

    def _on_query_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.recorder.query_output = output

    def captures(self, needs: Needs, projected: torch.Tensor) -> Captures:
        """The batch's :class:`~catp.methods.Captures`, with what a method with ``needs`` reads.

        Args:
            needs: the method's needs (a subset of what was captured).
            projected: the batch's projected connector output ``(B, Q, D_llm)``.
        """
        assert self.recorder.query_output is not None, "the connector output was not recorded inside the capture"
        return self.recorder.captures(needs, projected, published_layer_weights=self.family.published_layer_weights)


class CatpModel:
    """Mixed into a family's vLLM model: its language model receives only each image's kept tokens.

    The settings come from ``config.catp`` (the engine's) and each request's
    ``mm_processor_kwargs``; see :mod:`catp.vllm`. The family's class calls :meth:`_catp_init`
    after the stock ``__init__``; the stock ``_parse_and_validate_image_input`` and
    ``_process_image_input`` (the projected connector output, ``(B, Q, D_llm)`` or one ``(Q, D_llm)`` per
    image) run unchanged.
    """

    config: Any

    def _catp_init(self, vllm_config: VllmConfig) -> None:
        # Checked again here in case the front-end hook did not run (another vLLM version).
        check_engine(self.config, int(vllm_config.parallel_config.tensor_parallel_size))
        self._methods: dict[str, PruningMethod] = {}
        self._record = recording()

    def _method(self, request: ImageRequest) -> PruningMethod:
        key = request.method_key
        if key not in self._methods:
            self._methods[key] = Settings(request.method, request.keep, request.options).build()
        return self._methods[key]

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor] | torch.Tensor:
        field_data = kwargs.pop(FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        q = served_family(self.config.model_type).num_queries(self.config)
        requests = _decode_requests(field_data) if field_data is not None else []
        if image_input.type == "image_embeds" or all(r.keep == q for r in requests):
            return self._process_image_input(image_input)  # stock: nothing pruned, nothing scored
        return self._pruned_embeddings(image_input, requests)

    def _pruned_embeddings(self, image_input: Any, requests: list[ImageRequest]) -> list[torch.Tensor]:
        """Each image's kept rows of the projected query tokens, ascending."""
        family = served_family(self.config.model_type)
        q = family.num_queries(self.config)
        groups: dict[str, list[int]] = {}
        for row, request in enumerate(requests):
            if request.keep < q:
                groups.setdefault(request.method_key, []).append(row)
        methods = {key: self._method(requests[rows[0]]) for key, rows in groups.items()}
        with torch.no_grad(), ConnectorCapture(self, family, union(m.needs for m in methods.values())) as capture:
            projected = self._process_image_input(image_input)
        kept: list[torch.Tensor | None] = [None] * len(requests)
        for key, rows in groups.items():
            method = methods[key]
            captures = capture.captures(method.needs, projected)
            if len(rows) < len(requests):
                captures = captures.take_rows(torch.tensor(rows, device=projected.device))
            counts = torch.tensor([requests[r].keep for r in rows], device=projected.device)
            indices = choose(method, captures, counts).keep_indices
            for i, row in enumerate(rows):
                kept[row] = indices[i, : requests[row].keep]
        if self._record is not None:
            self._write_records(requests, kept)
        return [projected[b] if keep is None else projected[b].index_select(0, keep.to(projected.device))
                for b, keep in enumerate(kept)]

    def _write_records(self, requests: list[ImageRequest], kept: list[torch.Tensor | None]) -> None:
        with open(self._record, "a") as f:
            for request, keep in zip(requests, kept):
                if keep is not None:
                    record = {"tag": request.tag, "method": request.method, "options": dict(request.options),
                              "keep": request.keep, "kept": keep.tolist()}
                    f.write(json.dumps(record) + "\n")


@MULTIMODAL_REGISTRY.register_processor(CatpBlip2MultiModalProcessor, info=CatpBlip2ProcessingInfo, dummy_inputs=Blip2DummyInputsBuilder)
class CatpBlip2ForConditionalGeneration(CatpModel, Blip2ForConditionalGeneration):
    """vLLM's BLIP-2 whose language model receives only each image's kept query tokens (:class:`CatpModel`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._catp_init(vllm_config)

    def get_mm_lora_token_counts(self, *, modality: str, mm_kwargs: MultiModalKwargsItem | None,
                                 num_mm_embeds: int) -> tuple[int, int | None]:
        """Tokens the tower and the connector process for ``num_mm_embeds`` embeddings.

        Pruning leaves the tower and the connector's work unchanged (every image's ``N`` vision
        tokens and ``Q`` queries); only the number of embeddings per image changes, ``1..Q``.
        With one image's inputs the count is that image's; without (vLLM sizing its buffers)
        it is an upper bound: every embedding may be an image that keeps one token.
        """
        if num_mm_embeds <= 0:
            return 0, 0
        images = 1 if mm_kwargs is not None else num_mm_embeds
        return images * self._vision_tokens_per_image, images * served_family(self.config.model_type).num_queries(self.config)


@MULTIMODAL_REGISTRY.register_processor(CatpAriaMultiModalProcessor, info=CatpAriaProcessingInfo, dummy_inputs=AriaDummyInputsBuilder)
class CatpAriaForConditionalGeneration(CatpModel, AriaForConditionalGeneration):
    """vLLM's Aria whose language model receives only each image's kept projector queries (:class:`CatpModel`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._catp_init(vllm_config)
