"""Tiny Idefics2, Kosmos-2 and Aria models built from configs (no download), with their inputs.

The cross-attention connectors beyond the Q-Former (``SPEC.md`` §10): Idefics2's perceiver
resampler, Kosmos-2's image-to-text projection and Aria's projector. Each builder is seeded
and avoids the stock initialisation traps of §10.4:

* Idefics2's ``latents`` start as ones (every latent, every vote ties): drawn N(0, 1) here.
* Aria's projector ``query`` starts as zeros until ``_init_weights``: drawn N(0, 0.02) here.
* Kosmos-2's tied embeddings make a tiny random LM repeat one token: untied here.
* Attention projections of the connectors are drawn at a larger scale (``CONNECTOR_STD``),
  so that their probabilities are far from uniform.

Sizes (all three): vision width 32, 2 blocks, 4 heads; language models of width 32 with 2
layers (Aria's: width 64 in 2 heads of 32, the smallest head vLLM's CPU attention takes, and 2
experts of which each token takes 1, plus 1 shared expert); ``NUM_QUERY`` = 8 latents per
image. Idefics2 and Kosmos-2 take 32 px images in 8 px patches (16 patches; Kosmos-2's CLIP tower adds a CLS token: 17 image columns). Aria's image
processor only takes its two real resolutions, 490 and 980 px, so its tower has 70 px patches:
490 px gives 7 x 7 = 49 patches and 8 queries, 980 px 14 x 14 = 196 patches and 16 queries (the
prefix rule of its ``projector_patch_to_query_dict``, as 128 of Aria's 256).

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

from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

from catp.families.idefics2 import IDEFICS2

#: Idefics2, Kosmos-2 and Aria run in catp from transformers 5.25 (their encoder hand-off); on an older
#: release (the bottom of the declared range, 5.17, which BLIP-2 supports) their tests skip, and catp
#: refuses the models in one line (tests/test_pruning.py).
needs_family_transformers = pytest.mark.skipif(
    Version(transformers.__version__) < Version(IDEFICS2.min_transformers),
    reason=f"catp runs Idefics2, Kosmos-2 and Aria with transformers >= {IDEFICS2.min_transformers}")

FAMILIES: tuple[str, ...] = ("idefics2", "kosmos2", "aria")

#: Latents (queries) per image (Aria: per 490 px image).
NUM_QUERY = 8
IMAGE_SIZE = 32
PATCH_SIZE = 8
#: Aria's sides (its image processor's ``max_image_size`` values) and patch.
ARIA_IMAGE_SIZE = 490
ARIA_LARGE_IMAGE_SIZE = 980
ARIA_PATCH_SIZE = 70
#: Aria's queries for a 980 px image (196 patches); the 490 px one gets the first ``NUM_QUERY``.
ARIA_LARGE_QUERY = 16
#: Vocabulary rows of every tiny LLM: the reference tokenizer's 55 tokens, the 4 family specials
#: and the 11 tag tokens Kosmos-2's processor adds (``<grounding>``, ``<phrase>``, ...).
VOCAB = 80
#: Kosmos-2's processor's fixed placeholder count (a class attribute it does not save).
KOSMOS_PROCESSOR_QUERY = 64
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


#: The named special tokens each family's processor reads off its tokenizer (``tokenizer.image_token``, ...).
NAMED_TOKENS: dict[str, dict[str, str]] = {
    "idefics2": {"image_token": IMAGE, "image_boundary_token": FAKE_AROUND_IMAGE},
    "kosmos2": {},
    "aria": {"image_token": ARIA_IMAGE},
}


def tiny_tokenizer(family: str | None = None):
    """The reference model's word-level tokenizer plus :data:`SPECIALS` (offline).

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``</s>`` 2 (BOS and EOS), ``<image>`` 3, the words, then
    :data:`SPECIALS` in order (55..58), whatever the family. Pads on the left. With ``family``,
    the tokenizer also names the tokens its processor reads (:data:`NAMED_TOKENS`).
    """
    import tempfile

    from transformers import PreTrainedTokenizerFast

    from catp.reference import reference_model_path

    tokenizer = PreTrainedTokenizerFast.from_pretrained(reference_model_path())
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE, *SPECIALS]})
    named = NAMED_TOKENS[family] if family is not None else {}
    if named:
        # Named tokens are declared when a tokenizer loads; they are already in the vocabulary, so
        # their ids do not move.
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, extra_special_tokens=named)
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
    from transformers import AriaConfig, AriaTextConfig, Idefics2Config, Idefics3VisionConfig, Kosmos2Config

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
        return Kosmos2Config(text_config=text, vision_config=dict(VISION), latent_query_num=num_queries, tie_word_embeddings=False)
    if family == "aria":
        # Heads of 32: vLLM's CPU attention takes head sizes 32, 64, 80, ... only.
        text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=256, moe_num_experts=2, moe_topk=1,
                    moe_num_shared_experts=1, **special)
        vision = dict(VISION, image_size=ARIA_IMAGE_SIZE, patch_size=ARIA_PATCH_SIZE)
        queries = {(ARIA_IMAGE_SIZE // ARIA_PATCH_SIZE) ** 2: num_queries,
                   (ARIA_LARGE_IMAGE_SIZE // ARIA_PATCH_SIZE) ** 2: 2 * num_queries}
        # Config objects, not dicts: the vLLM virtualenv's transformers (5.17) cannot build Aria from dicts.
        return AriaConfig(vision_config=Idefics3VisionConfig(**vision), text_config=AriaTextConfig(**text),
                          projector_patch_to_query_dict=queries, image_token_index=IDS[ARIA_IMAGE])
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


#: Each family's default weight seed: Idefics2's first whose raw vote (not only the renormalised
#: one) keeps a different top-4 set for each image of the test batch; with seed 0 its raw vote keeps
#: one or two sets for four images, the degenerate vote of ``SPEC.md`` §10.4 (measured).
DEFAULT_SEED: dict[str, int] = {"idefics2": 2, "kosmos2": 0, "aria": 0}


def tiny_model(family: str, seed: int | None = None, num_queries: int = NUM_QUERY) -> torch.nn.Module:
    """A seeded tiny random-weight ``family`` model in eval mode, LLM and connector on SDPA where they can be.

    The connector's latents and attention projections are redrawn so that votes neither tie
    nor follow a near-uniform map (module docstring). ``seed`` defaults to :data:`DEFAULT_SEED`.
    """
    from transformers import AriaForConditionalGeneration, Idefics2ForConditionalGeneration, Kosmos2ForConditionalGeneration

    torch.manual_seed(DEFAULT_SEED[family] if seed is None else seed)
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
        padded: ``(sample, image)`` pairs whose image is one and a half patches shorter, padded at
            the bottom: with Idefics2's rule (a patch is real when all its pixels are) two rows of
            patches are padding, with Aria's (any pixel) one row.
        image_sizes: ``(sample, image) -> side`` for Aria images of the large side
            (``ARIA_LARGE_IMAGE_SIZE``: ``ARIA_LARGE_QUERY`` queries); every image of a batch must
            have one side (the stock model stacks them).
        num_queries: ``Q`` of the model (placeholders per image; Aria: per 490 px image).

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
                side = image_sizes.get((sample, image), ARIA_IMAGE_SIZE)
                q = num_queries if side == ARIA_IMAGE_SIZE else 2 * num_queries
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
    short = IMAGE_SIZE - PATCH_SIZE - PATCH_SIZE // 2  # 20 px: Idefics2 pads 2 patch rows
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
        sides = {image_sizes.get((s, i), ARIA_IMAGE_SIZE) for s, n in enumerate(images_per_sample) for i in range(n)}
        if len(sides) != 1:
            raise ValueError("Aria stacks its images: every image of a batch must have the same side")
        side = sides.pop()
        total = sum(images_per_sample)
        pixels = torch.zeros(total, 3, side, side)
        mask = torch.zeros(total, side, side, dtype=torch.long)
        row = 0
        for sample, n_images in enumerate(images_per_sample):
            for image in range(n_images):
                height = side - ARIA_PATCH_SIZE - ARIA_PATCH_SIZE // 2 if (sample, image) in padded else side  # Aria pads 1 row
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


def saved_num_queries(family: str) -> int:
    """Q of a saved tiny checkpoint: Kosmos-2's processor does not save its placeholder count (a class
    attribute, 64), so a Kosmos-2 checkpoint that loads with its processor has 64 latents."""
    return KOSMOS_PROCESSOR_QUERY if family == "kosmos2" else NUM_QUERY


def save_tiny_checkpoint(family: str, folder: str | Path, seed: int | None = None) -> Path:
    """Write a tiny ``family`` model and its processor to ``folder`` with ``save_pretrained``.

    The folder loads with ``AutoModelForImageTextToText.from_pretrained`` and
    ``AutoProcessor.from_pretrained``. The model is ``tiny_model(family, seed,
    saved_num_queries(family))`` (:func:`saved_num_queries`).

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.
    """
    folder = Path(folder)
    model = tiny_model(family, seed, saved_num_queries(family))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    tiny_processor(family, saved_num_queries(family)).save_pretrained(folder)
    return folder


def tiny_processor(family: str, num_queries: int = NUM_QUERY):
    """The family's stock processor around :func:`tiny_tokenizer`, built offline (PIL image processors,
    no torchvision), laying inputs out as :func:`tiny_inputs` does.

    * Idefics2: ``Idefics2ImageProcessorPil`` at 32 px, no image splitting, ``image_seq_len`` = Q.
    * Kosmos-2: ``CLIPImageProcessorPil`` at 32 px; ``num_image_tokens`` = Q (not saved: a reloaded
      processor writes 64); no patch-index tokens.
    * Aria: ``AriaImageProcessorPil`` (490 or 980 px only), ``size_conversion`` {490: Q, 980: 2Q}.
      ``AriaProcessor`` resizes to 980 px (2Q placeholders) unless called with ``max_image_size=490``.
    """
    from transformers import AriaProcessor, Idefics2Processor, Kosmos2Processor
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tokenizer = tiny_tokenizer(family)
    if family == "idefics2":
        images = Idefics2ImageProcessorPil(size={"shortest_edge": IMAGE_SIZE, "longest_edge": IMAGE_SIZE}, do_image_splitting=False)
        return Idefics2Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=num_queries)
    if family == "kosmos2":
        images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        processor = Kosmos2Processor(image_processor=images, tokenizer=tokenizer, num_patch_index_tokens=0)
        processor.num_image_tokens = num_queries
        return processor
    if family == "aria":
        images = AriaImageProcessorPil(max_image_size=ARIA_IMAGE_SIZE, min_image_size=ARIA_PATCH_SIZE, split_image=False)
        return AriaProcessor(image_processor=images, tokenizer=tokenizer,
                             size_conversion={ARIA_IMAGE_SIZE: num_queries, ARIA_LARGE_IMAGE_SIZE: 2 * num_queries})
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
