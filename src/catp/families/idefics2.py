"""Idefics2: the perceiver-resampler family (``Idefics2ForConditionalGeneration``).

* Connector: ``model.model.connector`` runs ``modality_projection`` (vision to text width) first,
  then the ``perceiver_resampler``: ``Q = perceiver_config.resampler_n_latents`` latents, ``depth``
  layers that all cross-attend (``layers[i].self_attn``), a final RMS ``norm``.
* Attention: one softmax over the key axis ``[N image tokens ; Q latents]``, probabilities
  ``(rows, H, Q, N + Q)`` from the eager attention only; the image is the first ``N`` columns.
  Only the resampler is switched to eager (its own sub-config); vision and LLM keep theirs.
* What the vote reads (:attr:`Idefics2Family.renormalise`): each query's image probabilities
  share its ``1/Z``, and ``Z`` also sums the image-independent latent block; by default the image
  columns are renormalised to sum 1 per (head, query) before the vote.
* Padded patches (batch padding: a patch is real only if all its pixels are) get probability 0
  from every query; the connector's ``attention_mask`` says which, and they cast no vote.
* Output: the input of ``norm`` (what ``l2norm`` reads: with ``norm.weight`` at 1, every output
  row has norm ``sqrt(D)``) and its output (the LLM's tokens: nothing projects after the resampler).
* ``selfattn``: the latent block ``A[..., N:]`` of the same softmax.
* Placeholders: ``config.image_token_id``, ``Q`` per image or crop. Image splitting gives several
  crops per image, each with its own latents: each crop (and each image of a prompt with several)
  is one group, in the order of the placeholders.
* Generate encodes the images before the prefill (``get_image_features``, transformers 5.25), so
  the engine encodes first and hands the kept rows over as ``mm_encoder_outputs``
  (:attr:`~catp.families.base.Family.encodes_first`).
* ``catp-image``: the last SigLIP block's probabilities, recomputed from its ``q_proj`` / ``k_proj``
  with the patch mask it gets.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from catp.capture import attention_probabilities
from catp.families.base import LatentSoftmaxFamily, random_text_ids, sub_config_attention

__all__ = ["IDEFICS2", "Idefics2Family"]


@dataclass
class Idefics2Family(LatentSoftmaxFamily):
    """The Idefics2 family (see the module docstring). ``renormalise``: see :class:`~catp.families.base.LatentSoftmaxFamily`."""

    name: ClassVar[str] = "idefics2"
    model_classes: ClassVar[dict[str, str]] = {"idefics2": "Idefics2ForConditionalGeneration"}
    connector: ClassVar[str] = "perceiver latents"
    group: ClassVar[str] = "crop"
    model_inputs: ClassVar[tuple[str, ...]] = ("pixel_attention_mask",)
    min_transformers: ClassVar[str] = "5.25"  # the oldest release tested with this family
    encodes_first: ClassVar[bool] = True
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_attention_mask")
    default_scope: ClassVar[str] = "group"
    prompt_image: ClassVar[str | None] = "<image>"
    # The perceiver layers: attention (queries, keys and values over [image ; latents], output) and the gated MLP.
    adapter_targets: ClassVar[str] = (r"model\.connector\.perceiver_resampler\.layers\.\d+\."
                                      r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")

    @staticmethod
    def resampler(model: nn.Module) -> nn.Module:
        """The perceiver resampler."""
        return model.model.connector.perceiver_resampler

    # -- sizes --------------------------------------------------------------------------
    def num_queries(self, config: Any) -> int:
        return int(config.perceiver_config.resampler_n_latents)

    def num_cross_layers(self, config: Any) -> int:
        return int(config.perceiver_config.resampler_depth)

    def connector_flops(self, config: Any, image_tokens: int, instruction_tokens: int = 0) -> int:
        """``N (4 D_v F_t + 2 F_t D)`` for ``modality_projection`` (a gated MLP, vision width ``D_v`` to the text width
        ``D`` through the text MLP width ``F_t``), then per resampler layer, over ``N + Q`` keys:
        ``2 Q D a + 4 (N + Q) D kv + 4 Q (N + Q) a + 2 Q a D + 24 Q D^2`` (query, key/value and output projections,
        attention, the gated MLP of width ``4 D``); ``a`` the heads' width, ``kv`` the key/value heads' width."""
        perceiver, n = config.perceiver_config, image_tokens
        q, d = self.num_queries(config), int(config.text_config.hidden_size)
        a = int(perceiver.resampler_n_heads) * int(perceiver.resampler_head_dim)
        kv = int(perceiver.num_key_value_heads) * int(perceiver.resampler_head_dim)
        f_t, d_v = int(config.text_config.intermediate_size), int(config.vision_config.hidden_size)
        layer = 2 * q * d * a + 4 * (n + q) * d * kv + 4 * q * (n + q) * a + 2 * q * a * d + 24 * q * d * d
        return n * (4 * d_v * f_t + 2 * f_t * d) + self.num_cross_layers(config) * layer

    def connector_parameters(self, config: Any) -> int:
        """``modality_projection`` (a gated MLP without biases: ``2 D_v F_t + F_t D``), the latents ``Q D``, per
        resampler layer ``D a + 2 D kv + a D`` (attention, no biases) ``+ 12 D^2`` (gated MLP of width ``4 D``)
        ``+ 3 D`` (three RMS norms), and the final norm ``D``."""
        perceiver = config.perceiver_config
        d, d_v, f_t = int(config.text_config.hidden_size), int(config.vision_config.hidden_size), int(config.text_config.intermediate_size)
        a = int(perceiver.resampler_n_heads) * int(perceiver.resampler_head_dim)
        kv = int(perceiver.num_key_value_heads) * int(perceiver.resampler_head_dim)
        layer = d * a + 2 * d * kv + a * d + 12 * d * d + 3 * d
        return 2 * d_v * f_t + f_t * d + self.num_queries(config) * d + self.num_cross_layers(config) * layer + d

    # -- attention ----------------------------------------------------------------------
    def cross_attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in self.resampler(model).layers]

    def vision_block(self, model: nn.Module) -> nn.Module | None:
        return model.model.vision_model.encoder.layers[-1].self_attn

    def vision_probabilities(self, block: nn.Module, hidden_states: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Recomputed from the SigLIP block's ``q_proj`` / ``k_proj`` and its patch mask (padded patches receive 0)."""
        batch, tokens = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, tokens, block.num_heads, -1).transpose(1, 2)

        return attention_probabilities(heads(block.q_proj(hidden_states)), heads(block.k_proj(hidden_states)),
                                       block.scale, attention_mask)

    def eager_connector(self, model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
        return sub_config_attention(self.resampler(model), "eager", enabled)

    def image_mask_module(self, model: nn.Module) -> nn.Module | None:
        return model.model.connector

    def image_mask(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The connector's ``attention_mask`` ``(rows, N)``: the real patches."""
        mask = args[1] if len(args) > 1 else kwargs["attention_mask"]
        return mask.bool()

    # -- output -------------------------------------------------------------------------
    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.vision_model

    def output_module(self, model: nn.Module) -> nn.Module:
        return self.resampler(model).norm

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.text_model

    def text_generator(self, model: nn.Module) -> nn.Module:
        """The model itself: its ``text_model`` has no LM head, and without pixels it runs the text alone."""
        return model

    # -- placeholders -------------------------------------------------------------------
    def image_batch(self, images: list[Any]) -> Any:
        """A list of images per sample: the image processor reads a flat list as the images of one sample."""
        return [[image] for image in images]

    def placeholder_token_id(self, model: nn.Module) -> int:
        token = getattr(model.config, "image_token_id", None)
        if token is None:
            raise ValueError(f"{type(model).__name__}.config.image_token_id is None: catp finds the latents' placeholders "
                             "in input_ids by that id; set it to the processor's <image> token id")
        return int(token)

    def has_groups(self, model: nn.Module) -> bool:
        return True

    def groups_per_sample(self, model: nn.Module, pixel_values: torch.Tensor,
                          input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Real images (crops) per sample: as the stock ``get_image_features``, an image whose pixels are all 0
        is padding."""
        if pixel_values.dim() != 5:
            raise ValueError(f"Idefics2 takes pixel_values of shape (batch, images, channels, height, width), "
                             f"got {tuple(pixel_values.shape)}")
        return (pixel_values != 0).flatten(2).any(dim=-1).sum(dim=1).long().cpu()

    def synthetic_inputs(self, model: nn.Module, batch: int, prompt_tokens: int, generator: torch.Generator,
                         groups: int = 1, instruction_tokens: int = 0) -> dict[str, torch.Tensor]:
        """``<s> <fake> (<image> x Q <fake>) x groups`` then text, per sample (the processor shares the
        ``<fake_token_around_image>`` between consecutive images; its id is not in the config, so a text id stands
        for it); ``pixel_values`` ``(B, groups, 3, H, W)`` and an all-ones ``pixel_attention_mask`` ``(B, groups, H, W)``."""
        config = model.config
        delimiters = groups + 2  # BOS and the fake tokens
        if prompt_tokens < delimiters:
            raise ValueError(f"Idefics2 needs at least {delimiters} prompt tokens (BOS and {groups + 1} "
                             f"<fake_token_around_image>), got {prompt_tokens}")
        image_id, q = self.placeholder_token_id(model), self.num_queries(config)
        text = random_text_ids(config.text_config.vocab_size, (batch, prompt_tokens), generator, avoid=image_id)
        fake = text[:, 1:2]
        image = torch.cat([torch.full((batch, q), image_id), fake], dim=1)
        ids = torch.cat([text[:, :2], *[image] * groups, text[:, delimiters:]], dim=1)
        if config.text_config.bos_token_id is not None:
            ids[:, 0] = config.text_config.bos_token_id
        side = self.image_side(config)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(batch, groups, 3, side, side, generator=generator),
                "pixel_attention_mask": torch.ones(batch, groups, side, side, dtype=torch.long)}

    def default_input_ids(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValueError("pruned generate() on Idefics2 needs input_ids with the <image> placeholders, as the processor "
                         "writes them")

    # -- running the connector alone ----------------------------------------------------
    def encode(self, model: nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> Any:
        return model.model.get_image_features(pixel_values, inputs.get("pixel_attention_mask"), return_dict=True)

    def pruned_inputs(self, encoded: Any, keep_indices: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
        """``mm_encoder_outputs`` whose ``pooler_output`` holds each sample's kept rows ``(k_b, D)``, in the order
        of its placeholders."""
        rows = [features.index_select(0, kept[kept >= 0].to(features.device))
                for features, kept in zip(encoded.pooler_output, keep_indices)]
        return {"mm_encoder_outputs": {"image": type(encoded)(**{**encoded, "pooler_output": rows})}}

    # -- adapting (catp adapt) ------------------------------------------------------------
    def learned_queries_at(self, model: nn.Module) -> tuple[nn.Module, str]:
        """The resampler's ``latents`` ``(Q, D)``."""
        return self.resampler(model), "latents"

    def truncation_refusal(self, config: Any) -> str | None:
        return None  # Q is one config field, and the processor's image_seq_len is saved with it

    def truncate_config(self, config: Any, k: int) -> None:
        config.perceiver_config.resampler_n_latents = k

    def truncate_processor(self, processor: Any, k: int) -> None:
        processor.image_seq_len = k  # <image> placeholders per image (per crop); an argument of its __init__, so saved


#: The family object.
IDEFICS2 = Idefics2Family()
