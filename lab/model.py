"""Build the reference model's config, tokenizer and processor.

The reference model is a stock ``Blip2ForConditionalGeneration``: ViT -> Q-Former (cross-
attention every 2nd layer, 32 query tokens) -> linear projection -> OPT. Its tokenizer is a
word-level ``tokenizers`` model wrapped in ``PreTrainedTokenizerFast``; its image processor
is ``BlipImageProcessorPil`` (no torchvision needed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

__all__ = ["ModelSize", "SIZES", "TEXT_ARCHES", "build_config", "build_text_config", "build_tokenizer", "build_processor", "words_of"]

PAD, UNK, EOS, IMAGE = "<pad>", "<unk>", "</s>", "<image>"


@dataclass(frozen=True)
class ModelSize:
    """Sizes of the three sub-models (all three share ``width``)."""

    width: int = 128
    vision_layers: int = 4
    #: 12 layers with cross-attention every 2nd: 6 cross-attention layers, as in BLIP-2.
    qformer_layers: int = 12
    text_layers: int = 4
    heads: int = 4
    #: 96 px with patch 6: 16 x 16 patches + CLS = 257 image tokens, as EVA ViT-g/14 at 224 px.
    image_size: int = 96
    patch_size: int = 6
    num_query_tokens: int = 32


SIZES: dict[str, ModelSize] = {
    "reference": ModelSize(),
    # For tests: the same structure, as small as it gets.
    "tiny": ModelSize(width=32, vision_layers=1, qformer_layers=2, text_layers=1, heads=2, image_size=32, patch_size=16),
}


def words_of(text: str) -> list[str]:
    """Split ``text`` the way the tokenizer does (words and punctuation runs)."""
    return re.findall(r"\w+|[^\w\s]+", text)


def build_tokenizer(texts: Iterable[str]):
    """A word-level ``PreTrainedTokenizerFast`` over the words of ``texts``.

    ``</s>`` is both BOS and EOS (as in OPT); it is prepended to every text. The vocabulary
    is sorted, so the same texts give the same ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, UNK, EOS, IMAGE]
    words = sorted({w for text in texts for w in words_of(text)})
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    core.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[IMAGE],
        padding_side="left",  # generation pads on the left, as for OPT
        model_max_length=128,
    )


def build_processor(tokenizer, size: ModelSize):
    """A ``Blip2Processor`` that inserts ``num_query_tokens`` ``<image>`` placeholders."""
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_processor = BlipImageProcessorPil(size={"height": size.image_size, "width": size.image_size})
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=size.num_query_tokens)


#: Language models the recipe can build: "opt" (BLIP-2's OPT: learnt positions, ReLU) or
#: "llama" (InstructBLIP's Vicuna family: rotary positions, a gated SiLU MLP).
TEXT_ARCHES: tuple[str, ...] = ("opt", "llama")


def build_text_config(arch: str, vocab_size: int, width: int, layers: int, heads: int, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    """The language model's config: an ``OPTConfig`` or a ``LlamaConfig`` of the given shape.

    OPT's MLP is 2 x width x ``4 * width`` weights; LLaMA's gated MLP is 3 x width x
    ``3 * width``, close to it. Both tie their input and output embeddings and have 128 positions.
    """
    from transformers import LlamaConfig, OPTConfig

    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, ffn_dim=4 * width,
            num_attention_heads=heads, max_position_embeddings=128, word_embed_proj_dim=width,
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128,
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, tie_word_embeddings=True,
        )
    raise ValueError(f"unknown language model arch {arch!r}; choose from {list(TEXT_ARCHES)}")


def build_config(size: ModelSize, tokenizer, qformer_text_input: bool = False, text_arch: str = "opt"):
    """The ``Blip2Config`` for ``size`` and ``tokenizer``, with a ``text_arch`` language model (:data:`TEXT_ARCHES`).

    Fixes a from-scratch trap of transformers: the vision config defaults to
    ``initializer_range=1e-10``, which leaves the ViT almost untrainable.
    ``qformer_text_input=True`` gives the Q-Former its text feed-forward blocks, for the
    stage-1 objectives (the shipped model, like a stock BLIP-2 for generation, has none).
    """
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    w = size.width
    vision = Blip2VisionConfig(
        hidden_size=w, intermediate_size=4 * w, num_hidden_layers=size.vision_layers, num_attention_heads=size.heads,
        image_size=size.image_size, patch_size=size.patch_size, initializer_range=0.02,
    )
    qformer = Blip2QFormerConfig(
        vocab_size=len(tokenizer), hidden_size=w, num_hidden_layers=size.qformer_layers, num_attention_heads=size.heads,
        intermediate_size=4 * w, cross_attention_frequency=2, encoder_hidden_size=w, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, use_qformer_text_input=qformer_text_input,
    )
    text = build_text_config(text_arch, len(tokenizer), w, size.text_layers, size.heads, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=size.num_query_tokens, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    config.catp_reference_size = asdict(size)
    return config
