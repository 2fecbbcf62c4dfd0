"""Tiny Idefics2, Kosmos-2 and Aria models built from configs (no download), with their inputs.

The cross-attention connectors beyond the Q-Former (``SPEC.md`` §10): Idefics2's perceiver
resampler, Kosmos-2's image-to-text projection and Aria's projector. Each builder is seeded
and avoids the stock initialisation traps of §10.4:

* Idefics2's ``latents`` start as ones (every latent, every vote ties): drawn N(0, 1) here.
* Aria's projector ``query`` starts as zeros until ``_init_weights``: drawn N(0, 0.02) here.
* Kosmos-2's tied embeddings make a tiny random LM repeat one token: untied here.
* Attention projections of the connectors are drawn at a larger scale (``CONNECTOR_STD``),
  so that their probabilities are far from uniform.

Sizes (all three): vision width 32, 2 blocks, 4 heads, 32 px images in 8 px patches
(16 patches; Kosmos-2's CLIP tower adds a CLS token: 17 image columns); language models of
width 32 with 2 layers; ``NUM_QUERY`` = 8 latents per image (Aria: 8 queries for a 32 px
image, 4 for a 16 px one, the prefix of its ``projector_patch_to_query_dict``).

The tokenizer is the shipped reference model's word-level tokenizer (read from its
checkpoint folder, never the hub) plus each family's special tokens.

Inputs are built by hand, as each family's processor lays them out (``SPEC.md`` §10):

* Idefics2: ``[PAD...] <s> (<fake> <image> x Q <fake>) per image, text``; ``pixel_values``
  ``(B, images, 3, H, W)``, ``pixel_attention_mask`` ``(B, images, H, W)``.
* Kosmos-2: ``[PAD...] <s> <image> (Q distinct ids unk+1..unk+Q) </image> text``;
  ``pixel_values`` ``(B, 3, H, W)``, ``image_embeds_position_mask`` ``(B, S)``, 1 on the Q ids.
* Aria: ``[PAD...] <s> (<|img|> x Q_i) per image, text``; ``pixel_values``
  ``(images, 3, H, W)``, ``pixel_mask`` ``(images, H, W)``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

FAMILIES: tuple[str, ...] = ("idefics2", "kosmos2", "aria")

#: Latents (queries) per image of a 32 px image.
NUM_QUERY = 8
#: Aria's queries for a 16 px image (4 patches): a prefix of the 8, as 128 is of Aria's 256.
ARIA_SMALL_QUERY = 4
IMAGE_SIZE = 32
PATCH_SIZE = 8
#: Vocabulary rows of every tiny LLM (the reference tokenizer's 55 tokens plus the family specials).
VOCAB = 64
#: Standard deviation of the connectors' attention projections (0.02 gives near-uniform maps).
CONNECTOR_STD = 0.3
#: Standard deviation of Kosmos-2's ``dense`` (unit-norm vision features to the image keys and values).
KOSMOS_DENSE_STD = 1.0

#: Special tokens each family's processor uses, added to the reference tokenizer.
FAKE_AROUND_IMAGE = "<fake_token_around_image>"
END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_END = "</image>"
ARIA_IMAGE = "<|img|>"
IMAGE = "<image>"  # already in the reference tokenizer (id 3)
SPECIALS: tuple[str, ...] = (FAKE_AROUND_IMAGE, END_OF_UTTERANCE, IMAGE_END, ARIA_IMAGE)

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
              patch_size=PATCH_SIZE, initializer_range=0.2)


def tiny_tokenizer():
    """The reference model's word-level tokenizer plus :data:`SPECIALS` (offline).

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``</s>`` 2 (BOS and EOS), ``<image>`` 3, the words, then
    :data:`SPECIALS` in order (55..58). Pads on the left.
    """
    from transformers import PreTrainedTokenizerFast

    from catp.reference import reference_model_path

    tokenizer = PreTrainedTokenizerFast.from_pretrained(reference_model_path())
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE, *SPECIALS]})
    assert len(tokenizer) <= VOCAB, len(tokenizer)
    return tokenizer


def token_ids() -> dict[str, int]:
    """The ids of the special tokens the inputs use (``pad``, ``unk``, ``bos``, and one per special string)."""
    tokenizer = tiny_tokenizer()
    ids = {"pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id, "bos": tokenizer.bos_token_id}
    ids.update({s: tokenizer.convert_tokens_to_ids(s) for s in (IMAGE, *SPECIALS)})
    return ids


IDS = token_ids()
PAD, UNK, BOS = IDS["pad"], IDS["unk"], IDS["bos"]


def tiny_config(family: str, num_queries: int = NUM_QUERY):
    """The config of a tiny ``family`` model (see the module docstring for its sizes)."""
    from transformers import AriaConfig, Idefics2Config, Kosmos2Config

    special = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=BOS)
    if family == "idefics2":
        text = dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5, **special)
        perceiver = dict(hidden_size=32, rms_norm_eps=1e-5, resampler_n_latents=num_queries, resampler_depth=3,
                         resampler_n_heads=4, resampler_head_dim=8, num_key_value_heads=2, initializer_range=CONNECTOR_STD)
        return Idefics2Config(vision_config=dict(VISION), perceiver_config=perceiver, text_config=text,
                              image_token_id=IDS[IMAGE], tie_word_embeddings=False)
    if family == "kosmos2":
        text = dict(vocab_size=VOCAB, max_position_embeddings=256, embed_dim=32, layers=2, ffn_dim=64, attention_heads=4,
                    dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False, **special)
        vision = {k: v for k, v in VISION.items()}
        return Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=num_queries, tie_word_embeddings=False)
    if family == "aria":
        text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, moe_num_experts=2, moe_topk=1,
                    moe_num_shared_experts=1, **special)
        vision = dict(model_type="idefics3_vision", **VISION)
        patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
        queries = {patches: num_queries, patches // 4: num_queries // 2}
        return AriaConfig(vision_config=vision, text_config=text, projector_patch_to_query_dict=queries,
                          image_token_index=IDS[ARIA_IMAGE])
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def tiny_model(family: str, seed: int = 0, num_queries: int = NUM_QUERY) -> torch.nn.Module:
    """A seeded tiny random-weight ``family`` model in eval mode, LLM and connector on SDPA where they can be.

    The connector's latents and attention projections are redrawn so that votes neither tie
    nor follow a near-uniform map (module docstring).
    """
    from transformers import AriaForConditionalGeneration, Idefics2ForConditionalGeneration, Kosmos2ForConditionalGeneration

    torch.manual_seed(seed)
    classes = {"idefics2": Idefics2ForConditionalGeneration, "kosmos2": Kosmos2ForConditionalGeneration,
               "aria": AriaForConditionalGeneration}
    model = classes[family](tiny_config(family, num_queries))
    with torch.no_grad():
        for projection in connector_attention_projections(model):
            projection.normal_(0.0, CONNECTOR_STD)
        if family == "kosmos2":
            # Its image keys come from unit-norm features through `dense`: at the stock 0.02 they are
            # tiny beside the N(0, 1) latent keys, and every image column looks alike.
            model.image_to_text_projection.dense.weight.normal_(0.0, KOSMOS_DENSE_STD)
        latents = connector_latents(model)
        if family == "aria":
            latents.normal_(0.0, 0.02)
        else:
            latents.normal_(0.0, 1.0)
    return model.eval()


def connector(model) -> torch.nn.Module:
    """The family's connector module (§10): the perceiver resampler, the projection, or the Aria projector."""
    name = type(model).__name__
    if name.startswith("Idefics2"):
        return model.model.connector.perceiver_resampler
    if name.startswith("Kosmos2"):
        return model.image_to_text_projection
    if name.startswith("Aria"):
        return model.model.multi_modal_projector
    raise TypeError(f"not a tiny family model: {name}")


def connector_latents(model) -> torch.nn.Parameter:
    """The learned queries: ``(Q_max, D)``."""
    module = connector(model)
    for name in ("latents", "latent_query", "query"):
        if hasattr(module, name):
            return getattr(module, name)
    raise TypeError(type(module).__name__)


def connector_attention_projections(model) -> list[torch.Tensor]:
    """The query and key projection weights of every connector attention (what shapes its probabilities)."""
    module = connector(model)
    name = type(model).__name__
    if name.startswith("Idefics2"):
        return [w for layer in module.layers for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight)]
    if name.startswith("Kosmos2"):
        return [module.x_attn.q_proj.weight, module.x_attn.k_proj.weight]
    attn = module.cross_attn
    return [attn.q_proj.weight, attn.k_proj.weight]


def num_queries_of(model, image_size: int = IMAGE_SIZE) -> int:
    """Queries per image of side ``image_size`` for ``model`` (Aria: from its patch-to-query dict)."""
    config = model.config
    name = type(model).__name__
    if name.startswith("Idefics2"):
        return config.perceiver_config.resampler_n_latents
    if name.startswith("Kosmos2"):
        return config.latent_query_num
    return config.projector_patch_to_query_dict[(image_size // config.vision_config.patch_size) ** 2]


def family_of(model) -> str:
    """``"idefics2"``, ``"kosmos2"`` or ``"aria"`` from the model's class."""
    name = type(model).__name__.lower()
    for family in FAMILIES:
        if name.startswith(family):
            return family
    raise TypeError(f"not a tiny family model: {type(model).__name__}")


def _text(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=False).input_ids


PROMPTS = ("Question: what color is the shape? Short answer:", "Question: is there a circle? Short answer:",
           "Question: what shape is it? Short answer:", "Question: is the shape red? Short answer:")


def tiny_inputs(family: str, images_per_sample: tuple[int, ...] = (1, 1), prompts: tuple[str, ...] | None = None,
                seed: int = 0, padded: tuple[tuple[int, int], ...] = (), image_sizes: dict[tuple[int, int], int] | None = None,
                num_queries: int = NUM_QUERY) -> dict[str, torch.Tensor]:
    """A left-padded batch in ``family``'s processor layout (module docstring).

    Args:
        images_per_sample: images of each sample (Kosmos-2: 1 each).
        prompts: one text per sample (default: :data:`PROMPTS`, cycled), tokenised without BOS.
        seed: draws the pixels (N(0, 1)).
        padded: ``(sample, image)`` pairs whose image is only ``IMAGE_SIZE - PATCH_SIZE - 4`` px high,
            padded at the bottom: with Idefics2's rule (a patch is real when all its pixels are) two
            rows of patches are padding, with Aria's (any pixel) one row.
        image_sizes: ``(sample, image) -> side`` for Aria images of another side (16 px: 4 patches,
            ``ARIA_SMALL_QUERY`` queries).
        num_queries: ``Q`` of the model (placeholders per 32 px image).

    Returns:
        ``input_ids``, ``attention_mask`` ``(B, S)`` and the family's pixel inputs.
    """
    tokenizer = tiny_tokenizer()
    image_sizes = image_sizes or {}
    batch = len(images_per_sample)
    prompts = prompts or tuple(PROMPTS[i % len(PROMPTS)] for i in range(batch))
    if family == "kosmos2" and any(n != 1 for n in images_per_sample):
        raise ValueError("Kosmos-2 takes one image per sample")
    g = torch.Generator().manual_seed(seed)
    rows: list[list[int]] = []
    position_masks: list[list[int]] = []
    for sample, n_images in enumerate(images_per_sample):
        ids = [BOS]
        marks = [0]
        for image in range(n_images):
            if family == "idefics2":
                block = [IDS[FAKE_AROUND_IMAGE]] + [IDS[IMAGE]] * num_queries + [IDS[FAKE_AROUND_IMAGE]]
                mark = [0] * len(block)
            elif family == "kosmos2":
                block = [IDS[IMAGE]] + [UNK + 1 + i for i in range(num_queries)] + [IDS[IMAGE_END]]
                mark = [0] + [1] * num_queries + [0]
            else:
                side = image_sizes.get((sample, image), IMAGE_SIZE)
                q = num_queries if side == IMAGE_SIZE else ARIA_SMALL_QUERY
                block = [IDS[ARIA_IMAGE]] * q
                mark = [0] * q
            ids += block
            marks += mark
        text = _text(tokenizer, prompts[sample])
        rows.append(ids + text)
        position_masks.append(marks + [0] * len(text))
    longest = max(len(r) for r in rows)
    input_ids = torch.tensor([[PAD] * (longest - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    short = IMAGE_SIZE - PATCH_SIZE - 4  # 20 px: Idefics2 pads 2 patch rows, Aria 1
    if family == "idefics2":
        most = max(images_per_sample)
        pixels = torch.zeros(batch, most, 3, IMAGE_SIZE, IMAGE_SIZE)
        mask = torch.zeros(batch, most, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
        for sample, n_images in enumerate(images_per_sample):
            for image in range(n_images):
                height = short if (sample, image) in padded else IMAGE_SIZE
                pixels[sample, image, :, :height] = torch.randn(3, height, IMAGE_SIZE, generator=g)
                mask[sample, image, :height] = 1
        inputs.update(pixel_values=pixels, pixel_attention_mask=mask)
    elif family == "kosmos2":
        inputs["pixel_values"] = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        longest_marks = [[0] * (longest - len(m)) + m for m in position_masks]
        inputs["image_embeds_position_mask"] = torch.tensor(longest_marks)
    else:
        # Aria: one row per image; images of one batch share a side (the stock model stacks them).
        sides = {image_sizes.get((s, i), IMAGE_SIZE) for s, n in enumerate(images_per_sample) for i in range(n)}
        if len(sides) != 1:
            raise ValueError("Aria stacks its images: every image of a batch must have the same side")
        side = sides.pop()
        total = sum(images_per_sample)
        pixels = torch.zeros(total, 3, side, side)
        mask = torch.zeros(total, side, side, dtype=torch.long)
        row = 0
        for sample, n_images in enumerate(images_per_sample):
            for image in range(n_images):
                height = min(short, side) if (sample, image) in padded else side
                pixels[row, :, :height] = torch.randn(3, height, side, generator=g)
                mask[row, :height] = 1
                row += 1
        inputs.update(pixel_values=pixels, pixel_mask=mask)
    return inputs


def placeholder_mask(family: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, S)`` bool: the positions the connector rows fill."""
    if family == "kosmos2":
        return inputs["image_embeds_position_mask"].bool()
    return inputs["input_ids"] == (IDS[IMAGE] if family == "idefics2" else IDS[ARIA_IMAGE])


def independent_copy(model) -> torch.nn.Module:
    """A deep copy with its own config objects (``_from_config`` shares them, §10.4)."""
    return copy.deepcopy(model)


def save_tiny_checkpoint(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``family`` model and its tokenizer to ``folder`` with ``save_pretrained``.

    The folder loads with ``AutoModelForImageTextToText.from_pretrained`` (Idefics2, Aria) or
    ``Kosmos2ForConditionalGeneration.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    Where the family's processor can be built offline (:func:`tiny_processor`), it is saved too.

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.
    """
    folder = Path(folder)
    model = tiny_model(family, seed)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    processor = tiny_processor(family)
    (processor if processor is not None else tiny_tokenizer()).save_pretrained(folder)
    return folder


def tiny_processor(family: str):
    """The family's stock processor around :func:`tiny_tokenizer`, built offline, or ``None`` where it cannot be."""
    return None
