"""Analytic cost of one BLIP-2 / InstructBLIP ``generate`` call, from the config alone.

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

Symbols: ``B`` batch, ``b`` beams, ``f`` frames (1 for images), ``k`` kept query tokens
(of ``f Q``), ``T`` text prompt tokens, ``S = k + T`` tokens into the LLM per sample, ``n``
new tokens, ``N`` image tokens, ``D`` widths, ``F`` MLP widths, ``L`` layers, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "LLMShape",
    "Workload",
    "StageFlops",
    "llm_shape",
    "vision_flops",
    "qformer_flops",
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
    """The language model's shape, normalised over OPT, LLaMA/Vicuna and T5.

    ``attn`` is the total query width ``H * head_dim``; ``kv`` the total key/value
    width ``H_kv * head_dim`` (smaller than ``attn`` under grouped-query attention).
    ``mlp_mats`` is 2 for a plain MLP (OPT, T5 relu) and 3 for a gated one
    (LLaMA SwiGLU, Flan-T5 gated-gelu).
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

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encoder_layers > 0


def llm_shape(text_config: Any) -> LLMShape:
    """Read an :class:`LLMShape` from a transformers text config (OPT, LLaMA, T5)."""
    kind = text_config.model_type
    if kind == "opt":
        if text_config.word_embed_proj_dim != text_config.hidden_size:
            raise ValueError("OPT with word_embed_proj_dim != hidden_size (opt-350m) is not modelled")
        d = text_config.hidden_size
        return LLMShape(kind, d, d, d, text_config.ffn_dim, 2, text_config.vocab_size, text_config.num_hidden_layers)
    if kind in ("llama", "mistral", "qwen2"):
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        return LLMShape(kind, text_config.hidden_size, heads * head_dim, kv_heads * head_dim, text_config.intermediate_size, 3,
                        text_config.vocab_size, text_config.num_hidden_layers)
    if kind == "t5":
        inner = text_config.num_heads * text_config.d_kv
        mats = 3 if text_config.is_gated_act else 2
        return LLMShape(kind, text_config.d_model, inner, inner, text_config.d_ff, mats, text_config.vocab_size,
                        text_config.num_decoder_layers, text_config.num_layers)
    raise ValueError(f"no cost model for a {kind!r} language model; supported: opt, llama, t5")


def image_tokens(vision_config: Any) -> int:
    """``N = (image_size / patch_size)^2 + 1`` (patches and CLS)."""
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


def vision_flops(vision_config: Any, batch: int) -> int:
    """ViT FLOPs for ``batch`` images.

    ``B [ 2 (N-1) (3 p^2) D  +  L ( 8 N D^2  +  4 N^2 D  +  4 N D F ) ]``:
    patch embedding, then per layer the fused qkv (``6 N D^2``) and output
    projection (``2 N D^2``), attention (``4 N^2 D``) and the MLP (``4 N D F``).
    """
    n, d, f = image_tokens(vision_config), vision_config.hidden_size, vision_config.intermediate_size
    patch = 2 * (n - 1) * 3 * vision_config.patch_size**2 * d
    layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * f
    return batch * (patch + vision_config.num_hidden_layers * layer)


def qformer_flops(config: Any, batch: int, instruction_tokens: int = 0) -> int:
    """Q-Former plus language projection FLOPs for ``batch`` samples (all ``Q`` queries;
    pruning happens after the projection, and the scoring is not counted).

    With ``s = Q + T_i`` self-attention tokens (``T_i`` instruction tokens, InstructBLIP),
    per layer: self-attention ``8 s d^2 + 4 s^2 d``; MLP ``4 Q d F`` for the queries and
    ``4 T_i d F`` for the instruction; every ``cross_attention_frequency``-th layer adds
    cross-attention ``4 Q d^2 + 4 N D_v d + 4 Q N d`` (query/output projections,
    key/value projections of the ``N`` image tokens of width ``D_v``, attention).
    Then the projection ``2 Q d D_llm``.
    """
    qc = config.qformer_config
    q, d, f = config.num_query_tokens, qc.hidden_size, qc.intermediate_size
    n, dv = image_tokens(config.vision_config), qc.encoder_hidden_size
    s = q + instruction_tokens
    total = 0
    for layer in range(qc.num_hidden_layers):
        total += 8 * s * d * d + 4 * s * s * d + 4 * s * d * f
        if layer % qc.cross_attention_frequency == 0:
            total += 4 * q * d * d + 4 * n * dv * d + 4 * q * n * d
    total += 2 * q * d * llm_shape(config.text_config).width
    return batch * total


def _decoder_layer_token_flops(shape: LLMShape, context: int, cross_context: int = 0) -> int:
    """FLOPs of one token through one decoder layer attending to ``context`` keys
    (and ``cross_context`` encoder keys whose K/V are cached): ``2 D (a + 2 kv) + 2 a D``
    projections, ``4 context a`` attention, ``2 m D F`` MLP (+ cross-attention
    ``4 D a + 4 cross_context a`` for T5)."""
    flops = 2 * shape.width * (shape.attn + 2 * shape.kv) + 2 * shape.attn * shape.width + 4 * context * shape.attn
    flops += 2 * shape.mlp_mats * shape.width * shape.ffn
    if cross_context:
        flops += 4 * shape.width * shape.attn + 4 * cross_context * shape.attn
    return flops


def llm_prefill_flops(config: Any, work: Workload) -> int:
    """LLM prefill FLOPs: the whole prompt and the first new token.

    Decoder-only, over ``R = B b`` rows of ``S`` tokens:
    ``R [ L ( S (2 D (a + 2 kv) + 2 a D + 2 m D F) + 4 S^2 a ) + 2 D V ]``.
    Encoder-decoder: the encoder on ``B`` rows,
    ``B L_e ( S (8 D a + 2 m D F) + 4 S^2 a )``, then the first decoder step on ``R`` rows,
    which also projects the encoder output to cross-attention keys/values
    (``R L_d 4 S D a``), and the LM head ``R 2 D V``.
    """
    shape = llm_shape(config.text_config)
    s, rows = work.llm_tokens, work.batch * work.beams
    head = rows * 2 * shape.width * shape.vocab
    mlp = 2 * shape.mlp_mats * shape.width * shape.ffn
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
    qformer: int
    prefill: int
    decode: int

    @property
    def total(self) -> int:
        return self.vision + self.qformer + self.prefill + self.decode

    def as_dict(self) -> dict[str, int]:
        return {"vision": self.vision, "qformer": self.qformer, "prefill": self.prefill, "decode": self.decode,
                "total": self.total}


def stage_flops(config: Any, work: Workload) -> StageFlops:
    """All stages of one ``generate`` call of ``work`` on a model of ``config``."""
    images = work.batch * work.frames
    return StageFlops(
        vision=vision_flops(config.vision_config, images),
        qformer=qformer_flops(config, images, work.instruction_tokens),
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


def _vision_params(vc: Any) -> int:
    d, f, n, p = vc.hidden_size, vc.intermediate_size, image_tokens(vc), vc.patch_size
    embed = d + (3 * p * p * d + d) + n * d  # CLS, patch conv, positions
    qkv_bias = 3 * d if getattr(vc, "qkv_bias", True) else 0  # one fused bias (k part held at zero)
    layer = 3 * d * d + qkv_bias + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d  # 2 LayerNorms
    return embed + vc.num_hidden_layers * layer + 2 * d


def _qformer_params(config: Any) -> int:
    qc = config.qformer_config
    d, f, dv = qc.hidden_size, qc.intermediate_size, qc.encoder_hidden_size
    text_input = getattr(qc, "use_qformer_text_input", None)
    instruct = config.model_type in ("instructblip", "instructblipvideo")
    has_text_ffn = instruct or bool(text_input)
    total = 2 * d  # input LayerNorm
    if instruct:
        total += qc.vocab_size * d + qc.max_position_embeddings * d
    ffn = (d * f + f) + (f * d + d) + 2 * d
    for layer in range(qc.num_hidden_layers):
        total += 3 * (d * d + d) + (d * d + d) + 2 * d + ffn * (2 if has_text_ffn else 1)
        if layer % qc.cross_attention_frequency == 0:
            total += (d * d + d) + 2 * (dv * d + d) + (d * d + d) + 2 * d
    return total


def _llm_params(text_config: Any) -> int:
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
    layer = d * shape.attn + 2 * d * shape.kv + shape.attn * d + 3 * d * shape.ffn + 2 * d
    return v * d + shape.decoder_layers * layer + d + head


def parameter_count(config: Any) -> dict[str, int]:
    """Parameters per component, from the config (biases and norms included).

    Used to refuse a model that cannot fit before allocating it; checked against
    models built on the meta device in the tests.
    """
    llm = llm_shape(config.text_config)
    parts = {
        "vision": _vision_params(config.vision_config),
        "qformer": _qformer_params(config) + config.num_query_tokens * config.qformer_config.hidden_size,
        "projection": config.qformer_config.hidden_size * llm.width + llm.width,
        "llm": _llm_params(config.text_config),
    }
    parts["total"] = sum(parts.values())
    return parts
