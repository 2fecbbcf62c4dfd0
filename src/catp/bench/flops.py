"""Analytic cost of one ``generate`` call of a model of any family (:mod:`catp.families`), from the config alone.

The stages: ``vision`` (the vision tower, a ViT), ``connector`` (the family's connector up to the
tokens the LLM receives: BLIP-2's Q-Former and projection, Idefics2's perceiver resampler, Kosmos-2's
image-to-text projection, Aria's projector; :meth:`~catp.families.base.Family.connector_flops`),
``prefill`` and ``decode`` (the language model). What differs between families is read from the
family: the image tokens per image (:meth:`~catp.families.base.Family.image_tokens`: a CLS token or
not, the resolution), the connector's cost and parameters; the LLM's shape from its config kind
(:func:`llm_shape`).

Conventions (the same in docs/performance.md):

* One multiply-accumulate = 2 FLOPs. Only matrix products are counted (linear layers,
  attention ``QK^T`` and ``PV``); norms, softmax, activations, the patch-embedding
  bias and the scoring (sorting 32 queries per voter) are lower-order and ignored.
* A linear layer ``(in -> out)`` on ``n`` tokens costs ``2 n in out``.
* Attention over ``s`` keys for ``n`` queries with total head width ``a`` costs
  ``4 n s a`` (``QK^T`` and ``PV``); dense kernels compute the full square for a
  causal prefill, so a prefill of ``S`` tokens counts ``4 S^2 a``.
* Stock ``generate`` with ``num_beams = b`` expands a decoder-only prompt to ``B b``
  rows *before* the prefill; an encoder-decoder LLM runs its encoder on ``B`` rows
  and only the decoder on ``B b`` rows. The prefill produces the first new token and
  computes logits at the last position only; each of the ``n - 1`` decode steps
  feeds one token per row.

* A video of ``f`` frames runs the vision tower and the Q-Former on ``B f`` images; the
  LLM then sees ``k`` of the sample's ``f Q`` query tokens.
* A mixture-of-experts LLM (Aria) counts the *active* FLOPs per token: the router, the
  top-k routed experts and the shared experts (:class:`LLMShape`); the total parameters
  (:func:`parameter_count`) count every expert.

Symbols: ``B`` batch, ``b`` beams, ``f`` frames (1 for images), ``k`` kept query tokens
(of ``f Q``), ``T`` text prompt tokens, ``S = k + T`` tokens into the LLM per sample, ``n``
new tokens, ``N`` image tokens, ``D`` widths, ``F`` MLP widths, ``L`` layers, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from catp.families import family_of_type

__all__ = [
    "LLMShape",
    "Workload",
    "StageFlops",
    "llm_shape",
    "vision_flops",
    "connector_flops",
    "llm_prefill_flops",
    "llm_decode_flops",
    "stage_flops",
    "kv_cache_bytes",
    "parameter_count",
    "image_tokens",
]


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration's shape.

    Attributes:
        batch: samples per call ``B``.
        keep: query tokens per sample in the LLM ``k`` (``f Q`` = unpruned). With per-sample
            budgets, the batch's largest count: shorter samples are padded to it with masked
            fillers, which the LLM computes like any token.
        prompt_tokens: text tokens per sample ``T`` (BOS included), after the placeholders.
        new_tokens: tokens generated per row ``n`` (forced: min = max).
        beams: beam width ``b``.
        instruction_tokens: InstructBLIP Q-Former text tokens per sample (0 for BLIP-2).
        frames: video frames per sample ``f`` (1 for images).
    """

    batch: int
    keep: int
    prompt_tokens: int
    new_tokens: int
    beams: int = 1
    instruction_tokens: int = 0
    frames: int = 1

    def __post_init__(self) -> None:
        for name in ("batch", "keep", "prompt_tokens", "new_tokens", "beams", "frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.instruction_tokens < 0:
            raise ValueError(f"instruction_tokens must be >= 0, got {self.instruction_tokens}")

    @property
    def llm_tokens(self) -> int:
        """Tokens into the LLM per sample, ``S = k + T``."""
        return self.keep + self.prompt_tokens


@dataclass(frozen=True)
class LLMShape:
    """The language model's shape, normalised over OPT, LLaMA/Vicuna/Mistral, T5, Kosmos-2's
    text decoder and Aria's mixture of experts.

    ``attn`` is the total query width ``H * head_dim``; ``kv`` the total key/value
    width ``H_kv * head_dim`` (smaller than ``attn`` under grouped-query attention).
    ``mlp_mats`` is 2 for a plain MLP (OPT, T5 relu, Kosmos-2) and 3 for a gated one
    (LLaMA SwiGLU, Flan-T5 gated-gelu, Mistral, Aria's experts). A mixture of experts runs
    ``experts`` MLPs of width ``ffn`` per token (the top-k routed and the shared ones; 1 for a
    dense MLP), after a router that scores ``router`` experts (0: none).
    """

    kind: str
    width: int
    attn: int
    kv: int
    ffn: int
    mlp_mats: int
    vocab: int
    decoder_layers: int
    encoder_layers: int = 0
    experts: int = 1
    router: int = 0

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encoder_layers > 0

    @property
    def mlp_macs(self) -> int:
        """Multiply-accumulates of one token through one layer's MLP (active experts and router): ``m D F e + D E``."""
        return self.mlp_mats * self.width * self.ffn * self.experts + self.width * self.router


def llm_shape(text_config: Any) -> LLMShape:
    """Read an :class:`LLMShape` from a transformers text config: OPT, LLaMA / Mistral / Qwen2 (grouped-query
    attention), T5, Kosmos-2's text decoder, Aria's mixture of experts (``moe_topk`` of ``moe_num_experts``
    routed experts and ``moe_num_shared_experts`` shared ones per token, all of width ``intermediate_size``)."""
    kind = text_config.model_type
    if kind == "opt":
        if text_config.word_embed_proj_dim != text_config.hidden_size:
            raise ValueError("OPT with word_embed_proj_dim != hidden_size (opt-350m) is not modelled")
        d = text_config.hidden_size
        return LLMShape(kind, d, d, d, text_config.ffn_dim, 2, text_config.vocab_size, text_config.num_hidden_layers)
    if kind in ("llama", "mistral", "qwen2", "aria_text"):
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        moe = {}
        if kind == "aria_text":
            moe = dict(experts=int(text_config.moe_topk) + int(text_config.moe_num_shared_experts),
                       router=int(text_config.moe_num_experts))
        return LLMShape(kind, text_config.hidden_size, heads * head_dim, kv_heads * head_dim, text_config.intermediate_size, 3,
                        text_config.vocab_size, text_config.num_hidden_layers, **moe)
    if kind == "kosmos_2_text_model":
        d = text_config.embed_dim
        return LLMShape(kind, d, d, d, text_config.ffn_dim, 2, text_config.vocab_size, text_config.layers)
    if kind == "t5":
        inner = text_config.num_heads * text_config.d_kv
        mats = 3 if text_config.is_gated_act else 2
        return LLMShape(kind, text_config.d_model, inner, inner, text_config.d_ff, mats, text_config.vocab_size,
                        text_config.num_decoder_layers, text_config.num_layers)
    raise ValueError(f"no cost model for a {kind!r} language model; supported: opt, llama, mistral, qwen2, t5, "
                     "kosmos_2_text_model, aria_text")


def image_tokens(config: Any) -> int:
    """``N``: vision tokens per image (frame, crop) of a model of ``config``, as its family feeds them to the
    connector (:meth:`~catp.families.base.Family.image_tokens`): BLIP-2 and Kosmos-2 ``(224/14)^2 + 1 = 257``
    (patches and CLS), Idefics2 ``(980/14)^2 = 4900``, Aria 4900 at 980 px (SigLIP: no CLS)."""
    return family_of_type(config.model_type).image_tokens(config)


def vision_flops(config: Any, images: int) -> int:
    """ViT FLOPs for ``images`` images (frames, crops).

    ``images [ 2 P (3 p^2) D  +  L ( 8 N D^2  +  4 N^2 D  +  4 N D F ) ]`` with ``N`` image tokens
    (:func:`image_tokens`) of which ``P`` patches: patch embedding, then per layer the query, key, value
    and output projections (``8 N D^2``), attention (``4 N^2 D``) and the MLP (``4 N D F``). The same for
    EVA (BLIP-2), CLIP (Kosmos-2) and SigLIP (Idefics2, Aria; every layer runs, also where the features
    are read before the last).
    """
    family, vc = family_of_type(config.model_type), config.vision_config
    n, d, f = image_tokens(config), int(vc.hidden_size), int(vc.intermediate_size)
    patches = n - family.class_tokens
    patch = 2 * patches * 3 * int(vc.patch_size) ** 2 * d
    layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * f
    return images * (patch + int(vc.num_hidden_layers) * layer)


def connector_flops(config: Any, images: int, instruction_tokens: int = 0) -> int:
    """Connector FLOPs for ``images`` images (frames, crops), all ``Q`` queries (pruning comes after the
    connector; the scoring is not counted): ``images`` times the family's
    :meth:`~catp.families.base.Family.connector_flops` over :func:`image_tokens` tokens, with InstructBLIP's
    ``instruction_tokens``.
    """
    family = family_of_type(config.model_type)
    return images * family.connector_flops(config, image_tokens(config), instruction_tokens)


def _decoder_layer_token_flops(shape: LLMShape, context: int, cross_context: int = 0) -> int:
    """FLOPs of one token through one decoder layer attending to ``context`` keys
    (and ``cross_context`` encoder keys whose K/V are cached): ``2 D (a + 2 kv) + 2 a D``
    projections, ``4 context a`` attention, ``2 m D F`` MLP (``2 (m D F e + D E)`` for a mixture
    of experts: :attr:`LLMShape.mlp_macs`) (+ cross-attention ``4 D a + 4 cross_context a`` for T5)."""
    flops = 2 * shape.width * (shape.attn + 2 * shape.kv) + 2 * shape.attn * shape.width + 4 * context * shape.attn
    flops += 2 * shape.mlp_macs
    if cross_context:
        flops += 4 * shape.width * shape.attn + 4 * cross_context * shape.attn
    return flops


def llm_prefill_flops(config: Any, work: Workload) -> int:
    """LLM prefill FLOPs: the whole prompt and the first new token.

    Decoder-only, over ``R = B b`` rows of ``S`` tokens:
    ``R [ L ( S (2 D (a + 2 kv) + 2 a D + 2 m D F) + 4 S^2 a ) + 2 D V ]`` (a mixture of experts:
    ``2 (m D F e + D E)`` in place of ``2 m D F``, :attr:`LLMShape.mlp_macs`).
    Encoder-decoder: the encoder on ``B`` rows,
    ``B L_e ( S (8 D a + 2 m D F) + 4 S^2 a )``, then the first decoder step on ``R`` rows,
    which also projects the encoder output to cross-attention keys/values
    (``R L_d 4 S D a``), and the LM head ``R 2 D V``.
    """
    shape = llm_shape(config.text_config)
    s, rows = work.llm_tokens, work.batch * work.beams
    head = rows * 2 * shape.width * shape.vocab
    mlp = 2 * shape.mlp_macs
    if not shape.is_encoder_decoder:
        proj = 2 * shape.width * (shape.attn + 2 * shape.kv) + 2 * shape.attn * shape.width
        return rows * shape.decoder_layers * (s * (proj + mlp) + 4 * s * s * shape.attn) + head
    encoder = work.batch * shape.encoder_layers * (s * (8 * shape.width * shape.attn + mlp) + 4 * s * s * shape.attn)
    first_step = rows * shape.decoder_layers * (_decoder_layer_token_flops(shape, 1, s) + 4 * s * shape.width * shape.attn)
    return encoder + first_step + head


def llm_decode_flops(config: Any, work: Workload) -> int:
    """FLOPs of the ``n - 1`` decode steps after the prefill, over ``R = B b`` rows.

    Step ``t = 1 .. n-1`` feeds one token per row with ``c_t`` cached keys
    (decoder-only ``c_t = S + t``; T5 ``c_t = t + 1`` plus ``S`` encoder keys):
    ``R sum_t [ L layer(c_t) + 2 D V ]`` with ``layer`` as in
    :func:`_decoder_layer_token_flops`.
    """
    shape = llm_shape(config.text_config)
    s, rows = work.llm_tokens, work.batch * work.beams
    total = 0
    for t in range(1, work.new_tokens):
        if shape.is_encoder_decoder:
            layer = _decoder_layer_token_flops(shape, t + 1, s)
        else:
            layer = _decoder_layer_token_flops(shape, s + t)
        total += shape.decoder_layers * layer + 2 * shape.width * shape.vocab
    return rows * total


@dataclass(frozen=True)
class StageFlops:
    """Analytic FLOPs of one call, per stage (see the module docstring)."""

    vision: int
    connector: int
    prefill: int
    decode: int

    @property
    def total(self) -> int:
        return self.vision + self.connector + self.prefill + self.decode

    def as_dict(self) -> dict[str, int]:
        return {"vision": self.vision, "connector": self.connector, "prefill": self.prefill, "decode": self.decode,
                "total": self.total}


def stage_flops(config: Any, work: Workload) -> StageFlops:
    """All stages of one ``generate`` call of ``work`` on a model of ``config``."""
    images = work.batch * work.frames
    return StageFlops(
        vision=vision_flops(config, images),
        connector=connector_flops(config, images, work.instruction_tokens),
        prefill=llm_prefill_flops(config, work),
        decode=llm_decode_flops(config, work),
    )


def kv_cache_bytes(config: Any, work: Workload, bytes_per_element: int) -> int:
    """Bytes of the LLM's key/value cache at the end of the call.

    Decoder-only: ``R L 2 kv (S + n - 1)`` elements (the last token's K/V is never stored).
    T5: ``R L_d 2 a (n + S)`` elements (self-attention over the decoder-start token and
    ``n - 1`` generated tokens, plus the cross-attention K/V of the ``S`` encoder tokens).
    """
    shape = llm_shape(config.text_config)
    rows = work.batch * work.beams
    if shape.is_encoder_decoder:
        positions, width = work.new_tokens + work.llm_tokens, shape.attn
    else:
        positions, width = work.llm_tokens + work.new_tokens - 1, shape.kv
    return rows * shape.decoder_layers * 2 * width * positions * bytes_per_element


def _vision_params(config: Any) -> int:
    """The vision tower: class token, patch convolution (with a bias or not:
    :attr:`~catp.families.base.Family.vision_patch_bias`), position table of the config's ``image_size``,
    a LayerNorm before the blocks or not (:attr:`~catp.families.base.Family.vision_pre_norm`), ``L`` blocks
    (four projections with biases, two LayerNorms, a two-matrix MLP), the final LayerNorm."""
    family, vc = family_of_type(config.model_type), config.vision_config
    d, f, p = int(vc.hidden_size), int(vc.intermediate_size), int(vc.patch_size)
    cls = family.class_tokens
    positions = (int(vc.image_size) // p) ** 2 + cls
    embed = cls * d + 3 * p * p * d + (d if family.vision_patch_bias else 0) + positions * d
    embed += 2 * d if family.vision_pre_norm else 0
    qkv_bias = 3 * d if getattr(vc, "qkv_bias", True) else 0  # BLIP-2: one fused bias (k part held at zero)
    layer = 3 * d * d + qkv_bias + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d  # 2 LayerNorms
    return embed + int(vc.num_hidden_layers) * layer + 2 * d


def _llm_params(text_config: Any) -> int:
    """The language model with its LM head (unless tied to the embeddings); every expert of a mixture."""
    shape, tc = llm_shape(text_config), text_config
    d, v = shape.width, shape.vocab
    tied = bool(getattr(tc, "tie_word_embeddings", True))
    head = 0 if tied else v * d
    if shape.kind == "opt":
        layer = 4 * (d * d + d) + (d * shape.ffn + shape.ffn) + (shape.ffn * d + d) + 4 * d
        return v * d + (tc.max_position_embeddings + 2) * d + tc.num_hidden_layers * layer + 2 * d + head
    if shape.kind == "t5":
        attn = 2 * d * shape.attn + 2 * shape.attn * d  # q, k, v, o (no biases)
        mlp = shape.mlp_mats * d * shape.ffn
        bias_table = tc.relative_attention_num_buckets * tc.num_heads
        encoder = shape.encoder_layers * (attn + mlp + 2 * d) + bias_table + d
        decoder = shape.decoder_layers * (2 * attn + mlp + 3 * d) + bias_table + d
        return v * d + encoder + decoder + head
    if shape.kind == "kosmos_2_text_model":
        f = shape.ffn
        # Four projections with biases, LayerNorms on the attention output (inner), before attention, inside the
        # MLP (width F) and before the MLP; sinusoidal positions (no parameters).
        layer = 4 * (d * d + d) + 2 * d + 2 * d + (d * f + f) + 2 * f + (f * d + d) + 2 * d
        return v * d + shape.decoder_layers * layer + 2 * d + head
    mlp = 3 * d * shape.ffn
    if shape.kind == "aria_text":  # every routed expert, the shared ones (one MLP of width F x shared), the router
        mlp = 3 * d * shape.ffn * (int(tc.moe_num_experts) + int(tc.moe_num_shared_experts)) + d * shape.router
    layer = d * shape.attn + 2 * d * shape.kv + shape.attn * d + mlp + 2 * d
    return v * d + shape.decoder_layers * layer + d + head


def parameter_count(config: Any) -> dict[str, int]:
    """Parameters per component (``vision``, ``connector``, ``llm``, ``total``), from the config (biases and
    norms included; a mixture of experts counts every expert).

    Used to refuse a model that cannot fit before allocating it; checked against
    models built on the meta device in the tests.
    """
    parts = {
        "vision": _vision_params(config),
        "connector": family_of_type(config.model_type).connector_parameters(config),
        "llm": _llm_params(config.text_config),
    }
    parts["total"] = sum(parts.values())
    return parts
