"""Tiny BLIP-2-family models built from configs (no download), one per supported family."""

from __future__ import annotations

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipVideoConfig,
    InstructBlipVideoForConditionalGeneration,
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
VIDEO_FAMILIES = ("instructblipvideo-llama", "instructblipvideo-t5")
FRAMES = 3  # not the 4 that the stock video generate() and processor assume


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A small random-weight model of ``family`` in eval mode."""
    torch.manual_seed(seed)
    arch, llm = family.split("-")
    common = dict(vision_config=VISION, qformer_config=QFORMER, text_config=TEXT[llm], num_query_tokens=NUM_QUERY,
                  image_token_index=IMAGE_TOKEN)
    if arch == "blip2":
        model = Blip2ForConditionalGeneration(Blip2Config(**common))
    elif arch == "instructblip":
        model = InstructBlipForConditionalGeneration(InstructBlipConfig(**common))
    else:
        common["video_token_index"] = common.pop("image_token_index")
        model = InstructBlipVideoForConditionalGeneration(InstructBlipVideoConfig(**common))
    # Distinct query tokens, so that scores differ between queries.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 1.0)
    return model.eval()


def tiny_inputs(family: str, prompt_lengths=(5, 3), layout: str = "processor", seed: int = 0,
                frames: int = FRAMES) -> dict[str, torch.Tensor]:
    """A left-padded batch like a processor makes: prompts of different lengths.

    layout "processor": [IMG x Q][PAD...][BOS text]  (the stock processor's order)
    layout "pad-first": [PAD...][IMG x Q][BOS text]

    A video family gets ``frames`` frames and ``frames x Q`` placeholders (the stock
    video processor needs torchvision, which this machine lacks).
    """
    video = family.startswith("instructblipvideo")
    placeholders = NUM_QUERY * (frames if video else 1)
    g = torch.Generator().manual_seed(seed)
    batch = len(prompt_lengths)
    longest = max(prompt_lengths)
    rows, masks = [], []
    for n in prompt_lengths:
        text = [BOS] + torch.randint(3, 90, (n,), generator=g).tolist()
        pad = [PAD] * (longest - n)
        img = [IMAGE_TOKEN] * placeholders
        if layout == "processor":
            rows.append(img + pad + text)
            masks.append([1] * placeholders + [0] * len(pad) + [1] * len(text))
        else:
            rows.append(pad + img + text)
            masks.append([0] * len(pad) + [1] * (placeholders + len(text)))
    image_shape = (frames, 3, 32, 32) if video else (3, 32, 32)
    inputs = {
        "pixel_values": torch.randn(batch, *image_shape, generator=g),
        "input_ids": torch.tensor(rows),
        "attention_mask": torch.tensor(masks),
    }
    if family.startswith("instructblip"):
        inputs["qformer_input_ids"] = torch.randint(3, 50, (batch, 4), generator=g)
        inputs["qformer_attention_mask"] = torch.ones(batch, 4, dtype=torch.long)
    return inputs


def is_video(model) -> bool:
    return type(model).__name__.startswith("InstructBlipVideo")


def hand_built_inputs(model, inputs: dict, sample: int, kept: list[int]) -> dict[str, torch.Tensor]:
    """One sample's pruned LLM input, built by hand: its prompt (padding and all) with only the
    placeholders of the ``kept`` query tokens (query ``i`` sits in placeholder ``i``) and their
    projected rows written in.

    Returns:
        ``inputs_embeds`` / ``attention_mask`` for the bare language model, and ``positions``:
        the caller positions that remain.
    """
    qformer = {k: v[sample : sample + 1] for k, v in inputs.items() if k.startswith("qformer_")}
    pixel_values = inputs["pixel_values"][sample : sample + 1]
    with torch.no_grad():
        features = model.get_video_features if is_video(model) else model.get_image_features
        rows = features(pixel_values, **qformer).pooler_output[0, kept]
        ids = inputs["input_ids"][sample]
        rank = (ids == IMAGE_TOKEN).cumsum(0) - 1
        keep = (ids != IMAGE_TOKEN) | torch.isin(rank, torch.tensor(kept))
        short = ids[keep][None]
        embeds = model.get_input_embeddings()(short)
        embeds[short == IMAGE_TOKEN] = rows.to(embeds.dtype)
    return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"][sample, keep][None],
            "positions": keep.nonzero().flatten()}


def hand_built_generate(model, inputs: dict, sample: int, kept: list[int], **generate_kwargs):
    """The bare language model's ``generate`` on :func:`hand_built_inputs`."""
    built = hand_built_inputs(model, inputs, sample, kept)
    with torch.no_grad():
        return model.language_model.generate(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"],
                                             **generate_kwargs)


def decoder_only(model) -> bool:
    """Whether ``model``'s language model is decoder-only (OPT, LLaMA) rather than T5."""
    return bool(model.config.use_decoder_only_language_model)


def qformer_inputs(inputs: dict) -> dict:
    """The InstructBLIP Q-Former inputs of a batch (empty for BLIP-2)."""
    return {k: v for k, v in inputs.items() if k.startswith("qformer_")}


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest scores' indices of each row, ascending (ties to the lower index), as catp keeps them."""
    from catp.selection import keep_mask, mask_indices

    return mask_indices(keep_mask(scores, k))


def top_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The same indices by descending score: a scorer's pick order."""
    from catp.selection import keep_mask, pick_order

    return pick_order(-scores.float(), keep_mask(scores, k))
