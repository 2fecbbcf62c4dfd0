"""Aria: the projector family (``AriaForConditionalGeneration``).

* Connector: ``model.model.multi_modal_projector`` (``AriaProjector``): learned ``query``
  ``(Q_max, D)``, ``cross_attn`` (``AriaCrossAttention``: ``q_proj``/``k_proj``/``v_proj`` feeding a
  ``torch.nn.MultiheadAttention``), then ``layer_norm`` and ``feed_forward`` (the MLP to the text width).
* ``Q`` depends on the resolution: ``projector_patch_to_query_dict`` maps an image's patch count to
  its query count (490 px: 128, 980 px: 256 in the released model); the smaller counts are a prefix
  of ``query``. All images of one call share a side (the stock model stacks them), so ``Q`` is one
  number per call (:meth:`AriaFamily.queries_for`).
* Attention: one ``nn.MultiheadAttention`` layer over the image patches only (no latent block). It
  returns head-averaged weights, which ``AriaCrossAttention`` discards; inside ``pruned()`` a forward
  pre-hook asks it for per-head weights ``(rows, H, Q, N)`` (``average_attn_weights=False``), whose
  head mean is the stock weights. ``_attn_implementation`` does not govern this module.
* Padded patches (``pixel_mask``: a patch is real if any of its pixels is) get probability 0 and cast
  no vote: the projector's ``attn_mask`` (``True`` on padding) says which.
* Output: ``l2norm`` reads the ``cross_attn`` output ``(rows, Q, D)``, before ``layer_norm`` +
  ``feed_forward``; the projector's output ``(rows, Q, D_llm)`` is what the LLM receives.
* ``selfattn``: refused: the queries never attend to each other.
* Placeholders: ``config.image_token_index`` (``<|img|>``), ``Q`` per image or crop; ``pixel_values``
  has one row per crop, over the whole batch, so the groups of each sample are read from its
  placeholders. Each crop (each image of a prompt with several) is one group.
* Generate encodes the images before the prefill (transformers 5.25), so the engine encodes first
  and hands the kept rows over as ``mm_encoder_outputs`` (:attr:`~catp.families.base.Family.encodes_first`).
* vLLM serves Aria (:class:`catp.vllm.model.CatpAriaForConditionalGeneration`) with the same
  ``AriaCrossAttention``; its parts sit on the model itself rather than under ``model.model``, every
  image gets the largest ``Q``, and the probabilities are recomputed from the ``nn.MultiheadAttention``'s
  inputs and ``in_proj`` (:meth:`AriaFamily.recomputed_probabilities`).
* ``catp-image``: the vision block whose output is the features (``hidden_states[vision_feature_layer]``
  of the ``idefics3_vision`` tower, before ``post_layernorm``; the last block by default), recomputed
  from its ``q_proj`` / ``k_proj`` with the patch mask it gets.

Notation: ``I`` crops of a call, ``B`` samples, ``H`` heads, ``Q`` queries per crop, ``N`` patches, ``D`` width.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from catp.capture import attention_probabilities, qkv_probabilities
from catp.families.base import Family, random_text_ids
from catp.families.idefics2 import IDEFICS2

__all__ = ["ARIA", "AriaFamily"]


class AriaFamily(Family):
    """The Aria family (see the module docstring)."""

    name: ClassVar[str] = "aria"
    model_classes: ClassVar[dict[str, str]] = {"aria": "AriaForConditionalGeneration"}
    connector: ClassVar[str] = "projector queries"
    group: ClassVar[str] = "crop"
    model_inputs: ClassVar[tuple[str, ...]] = ("pixel_mask",)
    min_transformers: ClassVar[str] = "5.25"  # the oldest release tested with this family
    encodes_first: ClassVar[bool] = True
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_mask")
    default_scope: ClassVar[str] = "group"
    prompt_image: ClassVar[str | None] = "<|img|>"
    vllm_model_types: ClassVar[tuple[str, ...]] = ("aria",)
    vllm_architecture: ClassVar[str | None] = "CatpAriaForConditionalGeneration"
    # The projector: cross_attn's query, key and value projections and its output `linear`, and the feed-forward to the
    # text width. Not the nn.MultiheadAttention inside: its forward reads in_proj_weight and out_proj.weight directly,
    # past any LoRA wrapper.
    adapter_targets: ClassVar[str] = (r"model\.multi_modal_projector\."
                                      r"(cross_attn\.(q_proj|k_proj|v_proj|linear)|feed_forward\.(linear_in|linear_out))")

    @staticmethod
    def parts(model: nn.Module) -> nn.Module:
        """The module that holds the vision tower, the projector and the language model: ``model.model`` in
        transformers, the model itself in vLLM."""
        inner = getattr(model, "model", None)
        return inner if isinstance(inner, nn.Module) else model

    def projector(self, model: nn.Module) -> nn.Module:
        """The ``AriaProjector``."""
        return self.parts(model).multi_modal_projector

    # -- sizes --------------------------------------------------------------------------
    def num_queries(self, config: Any) -> int:
        """The largest ``Q`` (that of the largest resolution); a call's own is :meth:`queries_for`."""
        return max(int(q) for q in config.projector_patch_to_query_dict.values())

    def fixed_queries(self, config: Any) -> bool:
        return len({int(q) for q in config.projector_patch_to_query_dict.values()}) == 1

    def queries_for(self, model: nn.Module, pixel_values: torch.Tensor) -> int:
        """``Q`` of the images ``(I, 3, H, W)``: ``projector_patch_to_query_dict`` at their patch count."""
        if pixel_values.dim() != 4:
            raise ValueError(f"Aria takes pixel_values of shape (crops, channels, height, width), got {tuple(pixel_values.shape)}")
        patch = int(model.config.vision_config.patch_size)
        patches = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
        table = {int(n): int(q) for n, q in model.config.projector_patch_to_query_dict.items()}
        if patches not in table:
            sides = ", ".join(f"{math.isqrt(n) * patch} px" for n in sorted(table))
            raise ValueError(f"Aria's projector takes images of {sides} (projector_patch_to_query_dict); "
                             f"got {pixel_values.shape[-2]}x{pixel_values.shape[-1]} px ({patches} patches of {patch} px)")
        return table[patches]

    def image_side(self, config: Any) -> int:
        """The side whose patch count gets the most queries (``projector_patch_to_query_dict``): 980 px in the
        released model (4900 patches of 14 px, 256 queries)."""
        patches = max(config.projector_patch_to_query_dict.items(), key=lambda item: int(item[1]))[0]
        return math.isqrt(int(patches)) * int(config.vision_config.patch_size)

    def connector_flops(self, config: Any, image_tokens: int, instruction_tokens: int = 0) -> int:
        """With ``Q`` the queries of ``N = image_tokens`` patches (``projector_patch_to_query_dict``), ``D`` the vision
        width and ``D_t`` the text width: ``8 N D^2`` (the key and value projections, then ``nn.MultiheadAttention``'s)
        ``+ Q (8 D^2 + 4 N D + 2 D D_t + 2 D_t^2)`` (the query projections, ``out_proj`` and ``linear``, attention,
        ``feed_forward``)."""
        queries = {int(k): int(v) for k, v in config.projector_patch_to_query_dict.items()}
        if image_tokens not in queries:
            raise ValueError(f"Aria's projector takes {sorted(queries)} patches per image, got {image_tokens}")
        q, n = queries[image_tokens], image_tokens
        d, d_t = int(config.vision_config.hidden_size), int(config.text_config.hidden_size)
        return 8 * n * d * d + q * (8 * d * d + 4 * n * d + 2 * d * d_t + 2 * d_t * d_t)

    def connector_parameters(self, config: Any) -> int:
        """The ``query`` rows ``Q_max D``; ``cross_attn``: ``q_proj``/``k_proj``/``v_proj`` ``3 D^2`` (no biases),
        ``nn.MultiheadAttention`` ``4 D^2 + 4 D``, ``linear`` ``D^2 + D``, two LayerNorms ``4 D``; the projector's
        LayerNorm ``2 D`` and ``feed_forward`` ``D D_t + D_t^2`` (no biases)."""
        d, d_t = int(config.vision_config.hidden_size), int(config.text_config.hidden_size)
        cross = 3 * d * d + (4 * d * d + 4 * d) + (d * d + d) + 4 * d
        return self.num_queries(config) * d + cross + 2 * d + d * d_t + d_t * d_t

    def num_cross_layers(self, config: Any) -> int:
        return 1

    # -- attention ----------------------------------------------------------------------
    def cross_attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The ``nn.MultiheadAttention`` inside ``cross_attn``; it returns ``(output, weights)``."""
        return [self.projector(model).cross_attn.multihead_attn]

    def self_attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return []

    def self_attention_refusal(self, config: Any) -> str | None:
        return ("Aria's projector queries never attend to each other (one cross-attention over the image patches, "
                "no self-attention), so there is nothing for selfattn to read")

    def vision_block(self, model: nn.Module) -> nn.Module | None:
        index = self._feature_block(model.config)
        return None if index is None else self.parts(model).vision_tower.encoder.layers[index].self_attn

    @staticmethod
    def _feature_block(config: Any) -> int | None:
        """The index of the vision block whose output is the features (``hidden_states[vision_feature_layer]``;
        ``hidden_states[0]`` is the embeddings), or ``None`` where no single block gives them."""
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            return None
        blocks = int(config.vision_config.num_hidden_layers)
        entry = layer + blocks + 1 if layer < 0 else layer
        return entry - 1 if 1 <= entry <= blocks else None

    def vision_refusal(self, config: Any) -> str | None:
        if self._feature_block(config) is not None:
            return None
        return (f"Aria's features come from vision_feature_layer={config.vision_feature_layer!r}, not the output of "
                "one vision block, so catp-image has no last block whose attention it could read")

    def vision_probabilities(self, block: nn.Module, hidden_states: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The ``idefics3_vision`` block's attention is SigLIP's, as Idefics2's: recomputed the same way; vLLM's
        fuses ``q_proj``/``k_proj``/``v_proj`` into ``qkv_proj`` (heads of this tensor-parallel rank)."""
        if not hasattr(block, "qkv_proj"):
            return IDEFICS2.vision_probabilities(block, hidden_states, attention_mask)
        qkv, _ = block.qkv_proj(hidden_states)
        return qkv_probabilities(qkv, int(block.num_heads_per_partition), block.scale, attention_mask)

    def recomputed_probabilities(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """The ``nn.MultiheadAttention``'s per-head probabilities ``(rows, H, Q, N)`` in fp32, from its
        ``query`` ``(rows, Q, D)``, ``key`` ``(rows, N, D)``, ``in_proj_weight``/``in_proj_bias`` and ``attn_mask``
        (``(rows * H, Q, N)``, ``True`` on a padded patch); their head mean is the module's own weights."""
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        width, heads = module.embed_dim, module.num_heads
        weight = module.in_proj_weight.float()
        bias = None if module.in_proj_bias is None else module.in_proj_bias.float()

        def project(x: torch.Tensor, part: int) -> torch.Tensor:
            rows = slice(part * width, (part + 1) * width)
            out = nn.functional.linear(x.float(), weight[rows], None if bias is None else bias[rows])
            return out.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # (rows, H, S, d)

        allowed = None if mask is None else ~mask.reshape(query.shape[0], heads, query.shape[1], -1).bool()
        return attention_probabilities(project(query, 0), project(key, 1), (width // heads) ** -0.5, allowed)

    @contextlib.contextmanager
    def eager_connector(self, model: nn.Module, enabled: bool = True) -> Iterator[None]:
        """Ask the ``nn.MultiheadAttention`` for per-head weights ``(rows, H, Q, N)`` inside the block (it
        computes them anyway: the stock call keeps ``need_weights=True``); nothing else changes."""
        handles = []
        if enabled:
            for attention in self.cross_attention_modules(model):
                handles.append(attention.register_forward_pre_hook(_per_head_weights, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def image_mask_module(self, model: nn.Module) -> nn.Module | None:
        return self.projector(model)

    def image_mask(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """``(I, N)`` bool from the projector's inputs: ``key_value_states`` ``(I, N, D)`` and ``attn_mask``
        (``True`` on a padded patch; ``None``: none)."""
        patches = args[0] if args else kwargs.get("key_value_states", kwargs.get("x"))  # vLLM's projector names it x
        padded = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        if padded is None:
            return torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        return ~padded.bool()

    # -- output -------------------------------------------------------------------------
    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self.parts(model).vision_tower

    def output_module(self, model: nn.Module) -> nn.Module:
        """The projector: its output is the LLM's tokens ``(I, Q, D_llm)`` (its input is the patches; the
        connector output before the projection comes from :meth:`query_output_module`)."""
        return self.projector(model)

    def query_output_module(self, model: nn.Module) -> nn.Module | None:
        return self.projector(model).cross_attn

    def language_model(self, model: nn.Module) -> nn.Module:
        return self.parts(model).language_model

    def text_generator(self, model: nn.Module) -> nn.Module:
        """The model itself: its ``language_model`` has no LM head, and without pixels it runs the text alone."""
        return model

    # -- placeholders -------------------------------------------------------------------
    def placeholder_token_id(self, model: nn.Module) -> int:
        token = getattr(model.config, "image_token_index", None)
        if token is None:
            raise ValueError(f"{type(model).__name__}.config.image_token_index is None: catp finds the projector queries' "
                             "placeholders in input_ids by that id; set it to the processor's <|img|> token id")
        return int(token)

    def has_groups(self, model: nn.Module) -> bool:
        return True

    def groups_per_sample(self, model: nn.Module, pixel_values: torch.Tensor,
                          input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Crops per sample, from each sample's placeholders (``Q`` per crop); without ``input_ids`` every crop
        is a sample of its own (:func:`catp.select_queries`)."""
        queries = self.queries_for(model, pixel_values)
        crops = int(pixel_values.shape[0])
        if input_ids is None:
            return torch.ones(crops, dtype=torch.long)
        counts = (input_ids == self.placeholder_token_id(model)).sum(dim=1).cpu()
        uneven = (counts % queries).nonzero().flatten().tolist()
        if uneven:
            raise ValueError(f"input_ids must hold {queries} <|img|> placeholders per crop at this resolution "
                             f"({pixel_values.shape[-2]} px), as the processor inserts them; sample {uneven[0]} has "
                             f"{int(counts[uneven[0]])}")
        groups = counts // queries
        if int(groups.sum()) != crops:
            raise ValueError(f"input_ids hold placeholders for {int(groups.sum())} crops ({queries} each), but pixel_values "
                             f"has {crops}")
        return groups

    def synthetic_inputs(self, model: nn.Module, batch: int, prompt_tokens: int, generator: torch.Generator,
                         groups: int = 1, instruction_tokens: int = 0) -> dict[str, torch.Tensor]:
        """``<s> (<|img|> x Q) x groups`` then text, per sample, at :meth:`image_side`; ``pixel_values``
        ``(B groups, 3, H, W)`` (one row per crop) and an all-ones ``pixel_mask`` ``(B groups, H, W)``."""
        config = model.config
        image_id, side = self.placeholder_token_id(model), self.image_side(config)
        text = random_text_ids(config.text_config.vocab_size, (batch, prompt_tokens), generator, avoid=image_id)
        if config.text_config.bos_token_id is not None:
            text[:, 0] = config.text_config.bos_token_id
        images = torch.full((batch, groups * self.num_queries(config)), image_id)
        ids = torch.cat([text[:, :1], images, text[:, 1:]], dim=1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(batch * groups, 3, side, side, generator=generator),
                "pixel_mask": torch.ones(batch * groups, side, side, dtype=torch.long)}

    def default_input_ids(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValueError("pruned generate() on Aria needs input_ids with the <|img|> placeholders, as the processor writes them")

    # -- running the connector alone ----------------------------------------------------
    def encode(self, model: nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> Any:
        """The stock ``get_image_features`` at the model's ``vision_feature_layer`` (as its ``forward`` calls it);
        ``pooler_output`` ``(I, Q, D_llm)``."""
        return model.model.get_image_features(pixel_values=pixel_values, pixel_mask=inputs.get("pixel_mask"),
                                              vision_feature_layer=model.config.vision_feature_layer, return_dict=True)

    def pruned_inputs(self, encoded: Any, keep_indices: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
        """``mm_encoder_outputs`` whose ``pooler_output`` holds the kept rows in placeholder order.

        Aria's ``forward`` takes one tensor. Its rows are cut into chunks of ``c`` = the greatest common divisor
        of the samples' kept counts, ``(rows, c, D_llm)``: every sample starts a chunk, so ``generate`` can still
        split the rows per sample (beam search repeats each sample's). With a fixed keep ``k`` per crop this is
        the stock layout, ``(I, k, D_llm)`` with one crop per row, or whole samples.
        """
        features = encoded.pooler_output  # (I, Q, D_llm)
        queries = features.shape[1]
        crop_of_sample = torch.cumsum(groups, 0) - groups  # (B,) the first crop of each sample
        kept_rows = []
        for sample, kept in enumerate(keep_indices.cpu()):
            kept = kept[kept >= 0]
            crops = crop_of_sample[sample] + kept // queries
            kept_rows.append(features[crops.to(features.device), (kept % queries).to(features.device)])
        chunk = math.gcd(*(len(rows) for rows in kept_rows))
        rows = torch.cat(kept_rows).reshape(-1, chunk, features.shape[-1])
        from transformers.modeling_outputs import BaseModelOutputWithPooling  # not with ``import catp``

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=rows)}}

    # -- adapting (catp adapt) ------------------------------------------------------------
    def learned_queries_at(self, model: nn.Module) -> tuple[nn.Module, str]:
        """The projector's ``query`` ``(Q_max, D)``: each resolution takes a prefix of it."""
        return self.projector(model), "query"

    def truncation_refusal(self, config: Any) -> str | None:
        return ("Aria gives each image as many queries as its resolution calls for (projector_patch_to_query_dict "
                f"{dict(config.projector_patch_to_query_dict)}): there is no one count of first queries to cut; train with "
                "a method in the loop instead (--method)")


def _per_head_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A forward pre-hook on ``nn.MultiheadAttention``: return per-head weights ``(rows, H, Q, N)``."""
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


#: The family object.
ARIA = AriaFamily()
