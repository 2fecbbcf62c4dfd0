"""BLIP-2, InstructBLIP and InstructBLIP-Video: the Q-Former family.

* Connector: the Q-Former (``model.qformer``). Its ``Q = config.num_query_tokens`` query
  tokens cross-attend to the vision tokens in every ``cross_attention_frequency``-th layer
  (``layer.crossattention.attention``); every key is an image token. Its self-attention
  (``layer.attention.attention``) spans the queries (and, in InstructBLIP, the instruction
  tokens after them): ``selfattn`` sums the leading ``Q x Q`` block.
* Output: ``language_projection``'s input (the Q-Former output, ``(rows, Q, D)``) and output
  (the LLM's tokens, ``(rows, Q, D_llm)``).
* Placeholders: ``config.image_token_index`` (``video_token_index`` for video), ``Q`` per image,
  ``T x Q`` per video of ``T`` frames; each frame is one group.
* ``catp-image``: the last ViT block's fused ``qkv``, recomputed from its input.

The module attributes are the same in vLLM's BLIP-2 (:mod:`catp.vllm.model`), so the same
family object serves both engines.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from catp.capture import attention_probabilities, linear_fp32, qkv_probabilities
from catp.families.base import Family, random_text_ids, sub_config_attention

__all__ = ["BLIP2", "Blip2Family", "cross_attention_layer_count"]

_VIDEO_CLASS = "InstructBlipVideoForConditionalGeneration"
#: The model types whose Q-Former also reads an instruction (``qformer_input_ids``).
_INSTRUCT_TYPES = ("instructblip", "instructblipvideo")


def cross_attention_layer_count(qformer_config: Any) -> int:
    """How many Q-Former layers have a cross-attention block (layer ``i`` does when ``i % frequency == 0``)."""
    return len(range(0, int(qformer_config.num_hidden_layers), int(qformer_config.cross_attention_frequency)))


class Blip2Family(Family):
    """The Q-Former family (see the module docstring)."""

    name: ClassVar[str] = "blip2"
    model_classes: ClassVar[dict[str, str]] = {
        "blip-2": "Blip2ForConditionalGeneration",
        "instructblip": "InstructBlipForConditionalGeneration",
        "instructblipvideo": _VIDEO_CLASS,
    }
    connector: ClassVar[str] = "Q-Former query tokens"
    group: ClassVar[str] = "frame"
    model_inputs: ClassVar[tuple[str, ...]] = ("qformer_input_ids", "qformer_attention_mask", "interpolate_pos_encoding")
    vllm_model_types: ClassVar[tuple[str, ...]] = ("blip-2",)
    vllm_architecture: ClassVar[str | None] = "CatpBlip2ForConditionalGeneration"
    default_scope: ClassVar[str] = "video"
    published_layer_weights: ClassVar[bool] = True
    class_tokens: ClassVar[int] = 1
    # Q-Former linear layers that see the query tokens: self-attention, cross-attention (both with their output
    # projection) and the query feed-forward block. The text-only branches of a stage-1 Q-Former (intermediate,
    # output) never touch the queries.
    adapter_targets: ClassVar[str] = (
        r"qformer\.encoder\.layer\.\d+\.(attention|crossattention)\.(attention\.(query|key|value)|output\.dense)"
        r"|qformer\.encoder\.layer\.\d+\.(intermediate_query|output_query)\.dense")
    adapter_modules_to_save: ClassVar[tuple[str, ...]] = ("language_projection",)
    query_axis: ClassVar[int] = 1  # query_tokens: (1, Q, D)

    def is_video(self, model: nn.Module) -> bool:
        """Whether ``model`` is an InstructBLIP-Video model (``pixel_values`` ``(B, T, C, H, W)``)."""
        return any(c.__name__ == _VIDEO_CLASS for c in type(model).__mro__)

    # -- sizes --------------------------------------------------------------------------
    def num_queries(self, config: Any) -> int:
        return int(config.num_query_tokens)

    def num_cross_layers(self, config: Any) -> int:
        return cross_attention_layer_count(config.qformer_config)

    def connector_flops(self, config: Any, image_tokens: int, instruction_tokens: int = 0) -> int:
        """The Q-Former and ``language_projection``. With ``s = Q + T_i`` self-attention tokens (``T_i``
        instruction tokens, InstructBLIP), per layer: self-attention ``8 s d^2 + 4 s^2 d``, MLP ``4 s d F``; every
        ``cross_attention_frequency``-th layer adds cross-attention ``4 Q d^2 + 4 N D_v d + 4 Q N d`` (query and
        output projections, key and value projections of the ``N`` image tokens of width ``D_v``, attention). Then
        the projection ``2 Q d D_llm``."""
        qc = config.qformer_config
        q, d, f = self.num_queries(config), int(qc.hidden_size), int(qc.intermediate_size)
        n, d_v, s = image_tokens, int(qc.encoder_hidden_size), self.num_queries(config) + instruction_tokens
        total = 0
        for layer in range(int(qc.num_hidden_layers)):
            total += 8 * s * d * d + 4 * s * s * d + 4 * s * d * f
            if layer % int(qc.cross_attention_frequency) == 0:
                total += 4 * q * d * d + 4 * n * d_v * d + 4 * q * n * d
        return total + 2 * q * d * int(config.text_config.hidden_size)

    def connector_parameters(self, config: Any) -> int:
        """The Q-Former (InstructBLIP's with its text embeddings and its instruction MLPs), the query tokens and
        ``language_projection``."""
        qc = config.qformer_config
        d, f, d_v = int(qc.hidden_size), int(qc.intermediate_size), int(qc.encoder_hidden_size)
        instruct = config.model_type in _INSTRUCT_TYPES
        text_ffn = instruct or bool(getattr(qc, "use_qformer_text_input", None))
        total = 2 * d  # input LayerNorm
        if instruct:
            total += int(qc.vocab_size) * d + int(qc.max_position_embeddings) * d
        ffn = (d * f + f) + (f * d + d) + 2 * d
        for layer in range(int(qc.num_hidden_layers)):
            total += 3 * (d * d + d) + (d * d + d) + 2 * d + ffn * (2 if text_ffn else 1)
            if layer % int(qc.cross_attention_frequency) == 0:
                total += (d * d + d) + 2 * (d_v * d + d) + (d * d + d) + 2 * d
        width = int(config.text_config.hidden_size)
        return total + self.num_queries(config) * d + d * width + width

    # -- attention ----------------------------------------------------------------------
    def cross_attention_layers(self, model: nn.Module) -> list[nn.Module]:
        """The Q-Former layers that have a cross-attention block, in order."""
        return [layer for layer in model.qformer.encoder.layer if getattr(layer, "has_cross_attention", False)]

    def cross_attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.crossattention.attention for layer in self.cross_attention_layers(model)]

    def self_attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention.attention for layer in model.qformer.encoder.layer]

    def recomputed_probabilities(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """A Q-Former attention's probabilities ``(rows, H, S, K)`` recomputed in fp32 from its inputs
        (``softmax(q·kᵀ·scaling)``, no mask), for an attention that returns none (vLLM's SDPA).

        Its call's arguments: ``hidden_states`` (the query side ``(rows, S, D)``) and ``encoder_hidden_states``
        (the image tokens ``(rows, K, D_vision)`` for a cross-attention, else ``None``).
        """
        hidden_states = args[0] if args else kwargs["hidden_states"]
        encoder_hidden_states = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = module.transpose_for_scores(linear_fp32(module.query, hidden_states))
        key = module.transpose_for_scores(linear_fp32(module.key, source))
        return attention_probabilities(query, key, module.scaling)

    def vision_block(self, model: nn.Module) -> nn.Module | None:
        return model.vision_model.encoder.layers[-1].self_attn

    def vision_probabilities(self, block: nn.Module, hidden_states: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Recomputed from the block's fused ``qkv``: HF's returns a tensor; vLLM's a tuple, with the heads of
        this tensor-parallel rank (``num_heads_per_partition``)."""
        qkv = block.qkv(hidden_states)
        qkv = qkv[0] if isinstance(qkv, tuple) else qkv
        heads = int(getattr(block, "num_heads_per_partition", block.num_heads))
        return qkv_probabilities(qkv, heads, block.scale)

    def eager_connector(self, model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
        return sub_config_attention(model.qformer, "eager", enabled)

    # -- output -------------------------------------------------------------------------
    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.vision_model

    def output_module(self, model: nn.Module) -> nn.Module:
        return model.language_projection

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.language_model

    def decoder_only(self, model: nn.Module) -> bool:
        return bool(model.config.use_decoder_only_language_model)

    # -- placeholders -------------------------------------------------------------------
    def prepare_processor(self, processor: Any) -> Any:
        """A tokenizer that declares its image token in extra_special_tokens reloads it as a str, but
        ``Blip2Processor.__call__`` reads ``image_token.content``: make it an ``AddedToken`` again."""
        from tokenizers import AddedToken

        if isinstance(getattr(processor, "image_token", None), str):
            processor.image_token = AddedToken(processor.image_token, normalized=False, special=True)
        return processor

    def placeholder_token_id(self, model: nn.Module) -> int:
        """``config.image_token_index`` for images, ``config.video_token_index`` for video (which is ``None``
        in a video config built from an image model's: then a ``ValueError``)."""
        name = "video_token_index" if self.is_video(model) else "image_token_index"
        token = getattr(model.config, name, None)
        if token is None:
            raise ValueError(
                f"{type(model).__name__}.config.{name} is None: catp finds the query tokens' placeholders in input_ids "
                f"by that id; set it to the placeholder token's id (the processor's {name.split('_')[0]} token)"
            )
        return int(token)

    def has_groups(self, model: nn.Module) -> bool:
        return self.is_video(model)

    def groups_per_sample(self, model: nn.Module, pixel_values: torch.Tensor,
                          input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_video(model):
            if pixel_values.dim() != 5:
                raise ValueError(f"a video model takes pixel_values of shape (batch, frames, channels, height, width), "
                                 f"got {tuple(pixel_values.shape)}")
            frames = int(pixel_values.shape[1])
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got {tuple(pixel_values.shape)}")
        else:
            frames = 1
        return torch.full((pixel_values.shape[0],), frames, dtype=torch.long)

    def default_input_ids(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The stock default prompt (placeholders, then BOS), with the call's own frame count (the stock
        video ``generate()`` assumes 4 frames)."""
        placeholders = int(self.groups_per_sample(model, pixel_values)[0]) * self.num_queries(model.config)
        start = [self.placeholder_token_id(model)] * placeholders + [model.config.text_config.bos_token_id]
        return torch.tensor([start], device=pixel_values.device).repeat(pixel_values.shape[0], 1)

    def synthetic_inputs(self, model: nn.Module, batch: int, prompt_tokens: int, generator: torch.Generator,
                         groups: int = 1, instruction_tokens: int = 0) -> dict[str, torch.Tensor]:
        """``[IMG x groups Q][text x T]`` per sample, the text starting with BOS for a decoder-only LLM (as the
        processor writes it); ``pixel_values`` ``(B, 3, H, W)``, or ``(B, groups, 3, H, W)`` for video; InstructBLIP
        adds ``qformer_input_ids`` / ``qformer_attention_mask`` of ``instruction_tokens`` tokens."""
        config = model.config
        if groups != 1 and not self.is_video(model):
            raise ValueError(f"a {config.model_type} model takes one image per sample, got {groups} groups")
        image_id = self.placeholder_token_id(model)
        text = random_text_ids(config.text_config.vocab_size, (batch, prompt_tokens), generator, avoid=image_id)
        bos = config.text_config.bos_token_id
        if config.use_decoder_only_language_model and bos is not None:
            text[:, 0] = bos
        ids = torch.cat([torch.full((batch, groups * self.num_queries(config)), image_id), text], dim=1)
        side = self.image_side(config)
        shape = (batch, groups, 3, side, side) if self.is_video(model) else (batch, 3, side, side)
        out = {"pixel_values": torch.randn(shape, generator=generator), "input_ids": ids,
               "attention_mask": torch.ones_like(ids)}
        if config.model_type in _INSTRUCT_TYPES:
            out["qformer_input_ids"] = random_text_ids(config.qformer_config.vocab_size, (batch, instruction_tokens),
                                                       generator)
            out["qformer_attention_mask"] = torch.ones_like(out["qformer_input_ids"])
        return out

    # -- running the connector alone ----------------------------------------------------
    def encode(self, model: nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> Any:
        features = model.get_video_features if self.is_video(model) else model.get_image_features
        if "qformer_input_ids" in inspect.signature(features).parameters and inputs.get("qformer_input_ids") is None:
            raise ValueError(f"{type(model).__name__} needs qformer_input_ids (the instruction for its Q-Former)")
        return features(pixel_values, **inputs)

    # -- adapting (catp adapt) ------------------------------------------------------------
    def learned_queries_at(self, model: nn.Module) -> tuple[nn.Module, str]:
        """``model.query_tokens`` ``(1, Q, D)``."""
        return model, "query_tokens"

    def truncation_refusal(self, config: Any) -> str | None:
        if config.model_type == "blip-2":
            return None
        return (f"catp adapt --truncate runs on BLIP-2 (Blip2ForConditionalGeneration) only so far, not "
                f"{self.model_classes[config.model_type]}")

    def truncate_config(self, config: Any, k: int) -> None:
        config.num_query_tokens = k

    def truncate_processor(self, processor: Any, k: int) -> None:
        processor.num_query_tokens = k  # Blip2Processor inserts this many placeholders (saved with it)


#: The family object.
BLIP2 = Blip2Family()
