"""Kosmos-2: the image-to-text projection family (``Kosmos2ForConditionalGeneration``).

* Connector: ``model.image_to_text_projection``. ``dense`` maps the normalised vision tokens
  (CLS and patches, ``N`` of them) to the text width; ``Q = config.latent_query_num`` learned
  ``latent_query`` rows attend, in one ``x_attn`` (a ``KosmosTextAttention``), to
  ``[N image tokens ; Q latents]``. Its output is the LLM's input: nothing projects after it.
* Probabilities ``(rows, H, Q, N + Q)``, the image in the first ``N`` columns. CLS (column 0)
  votes: the latents attend to it as to any patch, as BLIP-2's Q-Former attends to its ViT's CLS.
* ``x_attn`` is built on ``config.text_config``, the very object the language model uses, so it
  cannot go eager alone: the LLM would go eager with it. catp leaves every attention setting as it
  is and recomputes ``x_attn``'s probabilities in fp32 from its ``q_proj`` / ``k_proj`` in a hook
  (as the vLLM engine does for BLIP-2), on whatever implementation the model runs.
* What the vote reads (:attr:`Kosmos2Family.renormalise`): each query's image probabilities share
  its ``1/Z``, and ``Z`` also sums the image-independent latent block; by default the image columns
  are renormalised to sum 1 per (head, query) before the vote (``docs/families.md``).
* ``selfattn``: the latent block ``A[..., N:]`` of the same softmax. ``l2norm``: ``x_attn``'s output.
* ``catp-image``: the last CLIP-like vision block's probabilities, recomputed from its
  ``q_proj`` / ``k_proj`` (its ``N`` tokens are the connector's image columns, CLS first).
* Placeholders: there is no image token id. The processor writes ``Q`` distinct ids after
  ``<image>`` and marks their positions in ``image_embeds_position_mask``, which is what catp reads.
  Pruning drops the dropped queries' positions from ``input_ids``, ``attention_mask`` and
  ``image_embeds_position_mask``, and keeps the kept queries' own ids. Which ids stay does not
  matter: the stock model overwrites the embeddings at the marked positions, and its sinusoidal
  positions count the non-pad tokens of ``input_ids``, so they follow from the shortened ids.
* Generate: the stock ``generate`` encodes the image once (``get_image_features``) and hands
  ``image_embeds`` to ``text_model.generate``; ``forward`` takes ``image_embeds`` in place of
  pixels too. So the engine encodes first and hands the kept rows over as ``image_embeds``
  (:attr:`~catp.families.base.Family.encodes_first`).
* Left padding: stock Kosmos-2 counts the pads in the positions of its decode steps, so a batch is
  not its samples run one by one; a pruned batch keeps every sample's pads, and so equals the stock
  model given the kept rows in the same batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from catp.capture import attention_probabilities, linear_fp32
from catp.families.base import LatentSoftmaxFamily, random_text_ids

__all__ = ["KOSMOS2", "Kosmos2Family"]

#: The input that marks the image positions.
POSITION_MASK = "image_embeds_position_mask"


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(rows, S, heads * d)`` -> ``(rows, heads, S, d)``."""
    return x.reshape(*x.shape[:2], heads, -1).transpose(1, 2)


@dataclass
class Kosmos2Family(LatentSoftmaxFamily):
    """The Kosmos-2 family (see the module docstring). ``renormalise``: see :class:`~catp.families.base.LatentSoftmaxFamily`."""

    name: ClassVar[str] = "kosmos2"
    model_classes: ClassVar[dict[str, str]] = {"kosmos-2": "Kosmos2ForConditionalGeneration"}
    connector: ClassVar[str] = "Kosmos-2 latent queries"
    class_tokens: ClassVar[int] = 1  # the vision tower's CLS is image column 0 (it votes)
    vision_patch_bias: ClassVar[bool] = False  # CLIP's tower: no bias on the patches, a LayerNorm before the blocks
    vision_pre_norm: ClassVar[bool] = True
    model_inputs: ClassVar[tuple[str, ...]] = ("interpolate_pos_encoding",)
    min_transformers: ClassVar[str] = "5.25"  # the oldest release tested with this family
    encodes_first: ClassVar[bool] = True
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "interpolate_pos_encoding")
    #: Fillers (left, where a Budget keeps fewer in some samples) are marked as image positions: they take the
    #: zero rows :meth:`pruned_inputs` puts first in those samples.
    position_inputs: ClassVar[Mapping[str, int]] = {POSITION_MASK: 1}
    # `dense` (image tokens to the text width) and x_attn (the latents over [image ; latents]).
    adapter_targets: ClassVar[str] = r"image_to_text_projection\.(dense|x_attn\.(q_proj|k_proj|v_proj|out_proj))"

    @staticmethod
    def projection(model: nn.Module) -> nn.Module:
        """The image-to-text projection (``dense``, ``latent_query``, ``x_attn``)."""
        return model.image_to_text_projection

    # -- sizes --------------------------------------------------------------------------
    def num_queries(self, config: Any) -> int:
        return int(config.latent_query_num)

    def connector_flops(self, config: Any, image_tokens: int, instruction_tokens: int = 0) -> int:
        """``2 N D_v D`` for ``dense`` (vision width ``D_v`` to the text width ``D``) on the ``N`` image tokens, then
        ``x_attn`` over ``N + Q`` keys: ``4 Q D^2`` (query and output projections) ``+ 4 (N + Q) D^2`` (keys and
        values) ``+ 4 Q (N + Q) D`` (scores and the weighted sum)."""
        n, q = image_tokens, self.num_queries(config)
        d, d_v = int(config.text_config.embed_dim), int(config.vision_config.hidden_size)
        return 2 * n * d_v * d + 4 * q * d * d + 4 * (n + q) * d * d + 4 * q * (n + q) * d

    def connector_parameters(self, config: Any) -> int:
        """``dense`` ``D_v D + D``, ``latent_query`` ``Q D`` and ``x_attn``'s four projections with biases ``4 (D^2 + D)``."""
        d, d_v = int(config.text_config.embed_dim), int(config.vision_config.hidden_size)
        return d_v * d + d + self.num_queries(config) * d + 4 * (d * d + d)

    def num_cross_layers(self, config: Any) -> int:
        return 1

    # -- attention ----------------------------------------------------------------------
    def cross_attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [self.projection(model).x_attn]

    def probabilities(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        """``x_attn``'s probabilities ``(rows, H, Q, N + Q)``, recomputed (:meth:`recomputed_probabilities`) from
        the call's inputs, whatever attention implementation it ran on."""
        return self.recomputed_probabilities(module, args, kwargs)

    def recomputed_probabilities(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """``softmax(q·kᵀ·scaling)`` in fp32 from ``x_attn``'s ``q_proj`` / ``k_proj`` (no mask: the projection
        passes none), from the call's ``hidden_states`` (the latent queries ``(rows, Q, D)``) and
        ``encoder_hidden_states`` (``[dense(image tokens) ; latent queries]`` ``(rows, N + Q, D)``).

        Returns:
            ``(rows, H, Q, N + Q)`` fp32.
        """
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        encoder_hidden_states = kwargs.get("encoder_hidden_states")
        if encoder_hidden_states is None:
            raise ValueError("Kosmos-2's x_attn ran without encoder_hidden_states: not the image-to-text projection's call")
        heads = int(module.num_heads)
        return attention_probabilities(_heads(linear_fp32(module.q_proj, hidden_states), heads),
                                       _heads(linear_fp32(module.k_proj, encoder_hidden_states), heads), module.scaling)

    def vision_block(self, model: nn.Module) -> nn.Module | None:
        return model.vision_model.model.encoder.layers[-1].self_attn

    def vision_probabilities(self, block: nn.Module, hidden_states: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Recomputed in fp32 from the CLIP-like block's ``q_proj`` / ``k_proj`` ``(rows, H, N, N)``; every token
        is real (the tower gets no mask)."""
        heads = int(block.num_heads)
        return attention_probabilities(_heads(linear_fp32(block.q_proj, hidden_states), heads),
                                       _heads(linear_fp32(block.k_proj, hidden_states), heads), block.scale, attention_mask)

    def eager_connector(self, model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
        """Nothing to switch: :meth:`probabilities` recomputes them (``x_attn`` shares the LLM's setting)."""
        return contextlib.nullcontext()

    # -- output -------------------------------------------------------------------------
    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.vision_model

    def output_module(self, model: nn.Module) -> nn.Module:
        return self.projection(model).x_attn

    def output_tokens(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_attn``'s output ``(rows, Q, D)``, twice: what ``l2norm`` reads and what the LLM receives."""
        return output[0], output[0]

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.text_model

    # -- placeholders -------------------------------------------------------------------
    def placeholder_token_id(self, model: nn.Module) -> int | None:
        """``None``: the image positions are marked by ``image_embeds_position_mask`` (:meth:`placeholder_mask`)."""
        return None

    def placeholder_mask(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``image_embeds_position_mask`` as a bool ``(B, L)`` (a ``ValueError`` when it is missing or
        does not match ``input_ids``)."""
        marks, input_ids = inputs.get(POSITION_MASK), inputs.get("input_ids")
        if marks is None:
            raise ValueError(f"Kosmos-2 has no image token id: pass {POSITION_MASK} (1 on the {self.connector}' "
                             "positions) with input_ids, as the processor returns them")
        if input_ids is not None and tuple(marks.shape) != tuple(input_ids.shape):
            raise ValueError(f"{POSITION_MASK} must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(marks.shape)}")
        return marks.bool()

    def groups_per_sample(self, model: nn.Module, pixel_values: torch.Tensor,
                          input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if pixel_values.dim() != 4:
            raise ValueError(f"Kosmos-2 takes pixel_values of shape (batch, channels, height, width), "
                             f"got {tuple(pixel_values.shape)}")
        return torch.ones(pixel_values.shape[0], dtype=torch.long)

    def synthetic_inputs(self, model: nn.Module, batch: int, prompt_tokens: int, generator: torch.Generator,
                         groups: int = 1, instruction_tokens: int = 0) -> dict[str, torch.Tensor]:
        """``<s> <image> (Q ids) </image>`` then text, per sample, and ``image_embeds_position_mask`` 1 on the ``Q``
        positions; ``pixel_values`` ``(B, 3, H, W)``. The ids at the marked positions are random: the model overwrites
        their embeddings (the processor writes ``unk+1 .. unk+Q``), and ``<image>`` / ``</image>`` are not in the config."""
        if groups != 1:
            raise ValueError(f"Kosmos-2 takes one image per sample, got {groups} groups")
        if prompt_tokens < 3:
            raise ValueError(f"Kosmos-2 needs at least 3 prompt tokens (BOS, <image>, </image>), got {prompt_tokens}")
        config, q = model.config, self.num_queries(model.config)
        ids = random_text_ids(config.text_config.vocab_size, (batch, prompt_tokens + q), generator)
        if config.text_config.bos_token_id is not None:
            ids[:, 0] = config.text_config.bos_token_id
        marks = torch.zeros_like(ids)
        marks[:, 2:2 + q] = 1  # after <s> <image>
        side = self.image_side(config)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), POSITION_MASK: marks,
                "pixel_values": torch.randn(batch, 3, side, side, generator=generator)}

    def default_input_ids(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"pruned generate() on Kosmos-2 needs input_ids and {POSITION_MASK}, as the processor "
                         "writes them")

    # -- running the connector alone ----------------------------------------------------
    def encode(self, model: nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> Any:
        return model.get_image_features(pixel_values, return_dict=True, **inputs)

    def pruned_inputs(self, encoded: Any, keep_indices: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
        """``image_embeds`` ``(B, K, D)``: each sample's kept rows, in ascending order.

        A sample that keeps ``k_b < K`` (a Budget) gets ``K - k_b`` zero rows first: its left fillers are
        marked as image positions (:attr:`position_inputs`) so that every row of the position mask
        holds ``K``, as the stock model's ``(B, K, D)`` assignment needs; the fillers are masked out
        of attention.
        """
        rows = encoded.pooler_output  # (B, Q, D)
        keep = keep_indices.to(rows.device)
        counts = (keep >= 0).sum(dim=1, keepdim=True)
        # Row b: its K - k_b padding slots first, then its kept indices (kept ascending, -1 padding last).
        slot = torch.arange(keep.shape[1], device=rows.device).expand_as(keep)
        source = keep.gather(1, (slot - (keep.shape[1] - counts)).clamp(min=0))
        filler = slot < keep.shape[1] - counts
        kept = rows.gather(1, source.clamp(min=0)[..., None].expand(-1, -1, rows.shape[-1]))
        return {"image_embeds": kept.masked_fill(filler[..., None], 0.0)}

    # -- adapting (catp adapt) ------------------------------------------------------------
    def learned_queries_at(self, model: nn.Module) -> tuple[nn.Module, str]:
        """The projection's ``latent_query`` ``(Q, D)``."""
        return self.projection(model), "latent_query"

    def truncation_refusal(self, config: Any) -> str | None:
        """``None`` where a saved processor keeps another placeholder count than 64 (:meth:`truncate_processor`)."""
        if _saved_processor_keeps_count():
            return None
        import transformers

        return (f"a Kosmos-2 export with k latents needs a processor that writes k placeholders, and this transformers' "
                f"({transformers.__version__}) Kosmos2Processor cannot save a count other than 64 (num_image_tokens is a "
                "class attribute); train with a method in the loop instead (--method)")

    def truncate_config(self, config: Any, k: int) -> None:
        config.latent_query_num = k

    def truncate_processor(self, processor: Any, k: int) -> None:
        """``num_image_tokens = k`` on this processor and on a saved copy: ``Kosmos2Processor`` keeps its count in a class
        attribute (64) that ``save_pretrained`` leaves out, but it merges its tokenizer's init kwargs, which the tokenizer
        saves, into each call's image kwargs, where ``num_image_tokens`` is read (:func:`_saved_processor_keeps_count`)."""
        processor.num_image_tokens = k
        processor.tokenizer.init_kwargs["num_image_tokens"] = k


def _saved_processor_keeps_count() -> bool:
    """Whether ``Kosmos2Processor`` reads ``num_image_tokens`` among its image kwargs (a deprecated key in transformers 5.25,
    to be removed in 5.29), where its tokenizer's saved init kwargs reach it (:meth:`Kosmos2Family.truncate_processor`)."""
    from transformers.models.kosmos2.processing_kosmos2 import Kosmos2ProcessorKwargs

    images = Kosmos2ProcessorKwargs.__annotations__.get("images_kwargs")
    return "num_image_tokens" in getattr(images, "__annotations__", {})


#: The family object.
KOSMOS2 = Kosmos2Family()
