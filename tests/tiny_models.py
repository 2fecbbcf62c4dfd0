"""Tiny BLIP-2-family models built from configs (no download), one per supported family."""

from __future__ import annotations

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
)

NUM_QUERY = 8
IMAGE_TOKEN = 99
VOCAB = 100
PAD = 1
BOS = 2

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
              initializer_range=0.2)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, encoder_hidden_size=32,
               vocab_size=50, max_position_embeddings=64)
TEXT = {
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=BOS),
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS,
                  eos_token_id=BOS),
    "t5": dict(model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
               pad_token_id=PAD, eos_token_id=BOS, decoder_start_token_id=PAD, bos_token_id=BOS),
}

FAMILIES = ("blip2-opt", "blip2-t5", "instructblip-llama", "instructblip-t5")


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A small random-weight model of ``family`` in eval mode."""
    torch.manual_seed(seed)
    arch, llm = family.split("-")
    common = dict(vision_config=VISION, qformer_config=QFORMER, text_config=TEXT[llm], num_query_tokens=NUM_QUERY,
                  image_token_index=IMAGE_TOKEN)
    if arch == "blip2":
        model = Blip2ForConditionalGeneration(Blip2Config(**common))
    else:
        model = InstructBlipForConditionalGeneration(InstructBlipConfig(**common))
    # Distinct query tokens, so that scores differ between queries.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 1.0)
    return model.eval()


def tiny_inputs(family: str, prompt_lengths=(5, 3), layout: str = "processor", seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch like a processor makes: prompts of different lengths.

    layout "processor": [IMG x Q][PAD...][BOS text]  (the stock processor's order)
    layout "pad-first": [PAD...][IMG x Q][BOS text]
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(prompt_lengths)
    longest = max(prompt_lengths)
    rows, masks = [], []
    for n in prompt_lengths:
        text = [BOS] + torch.randint(3, 90, (n,), generator=g).tolist()
        pad = [PAD] * (longest - n)
        img = [IMAGE_TOKEN] * NUM_QUERY
        if layout == "processor":
            rows.append(img + pad + text)
            masks.append([1] * NUM_QUERY + [0] * len(pad) + [1] * len(text))
        else:
            rows.append(pad + img + text)
            masks.append([0] * len(pad) + [1] * (NUM_QUERY + len(text)))
    inputs = {
        "pixel_values": torch.randn(batch, 3, 32, 32, generator=g),
        "input_ids": torch.tensor(rows),
        "attention_mask": torch.tensor(masks),
    }
    if family.startswith("instructblip"):
        inputs["qformer_input_ids"] = torch.randint(3, 50, (batch, 4), generator=g)
        inputs["qformer_attention_mask"] = torch.ones(batch, 4, dtype=torch.long)
    return inputs
