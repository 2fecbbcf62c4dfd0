"""The hand-built references of the cross-attention families are self-consistent on the stock models.

These check the references themselves (``tests/family_references.py``) before catp is compared
with them: keep = all through the reference is the stock model bit for bit, the reference depends
on which rows are kept, padding columns neither get probability nor vote, and the tiny models'
votes differ between the images of the batches the tests use (``SPEC.md`` §10.4).
"""

from __future__ import annotations

import pytest
import torch

from family_references import (
    connector_probabilities,
    connector_rows,
    image_columns,
    plain_vote,
    reference_forward,
    reference_generate,
    reference_votes,
    top_k,
)
from tiny_families import (
    ARIA_LARGE_IMAGE_SIZE,
    ARIA_LARGE_QUERY,
    FAMILIES,
    NUM_QUERY,
    connector_latents,
    placeholder_mask,
    save_tiny_checkpoint,
    saved_num_queries,
    tiny_inputs,
    tiny_model,
    tiny_processor,
)

from tiny_families import needs_family_transformers

pytestmark = needs_family_transformers

#: Per family, a batch with left padding and the family's traps: two images in a sample and a
#: padded image (Idefics2, Aria); Kosmos-2 takes one image per sample. The pixel seeds are the
#: first whose images all keep different top-4 sets, raw and renormalised (measured).
BATCHES: dict[str, dict] = {
    "idefics2": dict(images_per_sample=(1, 2, 1), padded=((1, 1),), seed=0),
    "kosmos2": dict(images_per_sample=(1, 1, 1), seed=3),
    "aria": dict(images_per_sample=(1, 2, 1), padded=((0, 0),), seed=4),
}
GREEDY = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return tiny_model(family)


@pytest.fixture(scope="module")
def inputs(family):
    return tiny_inputs(family, **BATCHES[family])


def all_rows(model, inputs) -> list[list[int]]:
    return [list(range(rows.shape[0])) for rows in connector_rows(model, inputs)]


def stock_generate(model, inputs, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    cut = inputs["input_ids"].shape[1]
    if isinstance(out, torch.Tensor):
        return out[:, cut:]
    out.sequences = out.sequences[:, cut:]
    return out


def test_latents_are_distinct_and_maps_far_from_uniform(model, inputs):
    latents = connector_latents(model)
    assert torch.cdist(latents, latents).fill_diagonal_(float("inf")).min() > 1e-3
    probabilities = connector_probabilities(model, inputs)[-1]
    columns = probabilities.shape[-1]
    assert probabilities.amax() > 4 / columns  # the largest probability is far above a uniform row's
    votes = reference_votes(model, inputs)
    assert (votes.amax(dim=1) > votes.amin(dim=1)).all()


def test_keep_all_generate_is_the_stock_generate_bit_for_bit(model, inputs):
    reference = reference_generate(model, inputs, all_rows(model, inputs), **GREEDY)
    stock = stock_generate(model, inputs, **GREEDY)
    assert torch.equal(reference.sequences, stock.sequences)
    assert all(torch.equal(a, b) for a, b in zip(reference.scores, stock.scores))


def test_keep_all_beam_search_is_the_stock_one(model, inputs):
    beams = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    assert torch.equal(reference_generate(model, inputs, all_rows(model, inputs), **beams), stock_generate(model, inputs, **beams))


def test_keep_all_forward_with_labels_is_the_stock_forward(model, inputs):
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    reference, positions = reference_forward(model, inputs, all_rows(model, inputs), labels=labels)
    with torch.no_grad():
        stock = model(**inputs, labels=labels)
    assert all(torch.equal(p, torch.arange(inputs["input_ids"].shape[1])) for p in positions)
    assert torch.equal(reference.logits, stock.logits)
    assert torch.equal(reference.loss, stock.loss)


def test_the_reference_depends_on_the_kept_rows(model, inputs):
    """Two kept sets of the same size give other logits: a row mix-up cannot pass unseen."""
    images = len(connector_rows(model, inputs))
    half = NUM_QUERY // 2
    low = [list(range(half))] * images
    high = [list(range(NUM_QUERY - half, NUM_QUERY))] * images
    a = reference_generate(model, inputs, low, **GREEDY)
    b = reference_generate(model, inputs, high, **GREEDY)
    assert not torch.equal(a.scores[0], b.scores[0])
    # Row by row too: each sample's first-step logits move when only its own rows change.
    for row in range(a.scores[0].shape[0]):
        assert not torch.equal(a.scores[0][row], b.scores[0][row])


def test_pruned_inputs_hold_k_placeholders_per_image(family, model, inputs):
    kept = top_k(reference_votes(model, inputs), 3)
    out, positions = reference_forward(model, inputs, kept)
    images = BATCHES[family]["images_per_sample"]
    removed = [len(torch.arange(inputs["input_ids"].shape[1])) - len(p) for p in positions]
    assert removed == [n * (NUM_QUERY - 3) for n in images]


def test_votes_differ_between_the_images(model, inputs):
    """The tiny models do not keep one set for every image (the degenerate votes of §10.4)."""
    for renormalise in (False, True):
        kept = top_k(reference_votes(model, inputs, renormalise=renormalise), NUM_QUERY // 2)
        assert len({tuple(k) for k in kept}) == len(kept), kept


@pytest.mark.parametrize("family", ["idefics2", "aria"], scope="module")
def test_padding_columns_get_no_probability_and_do_not_vote(family, model, inputs):
    probabilities = connector_probabilities(model, inputs)[-1]
    columns = image_columns(model, inputs)
    n = columns.shape[1]
    # Idefics2 (all pixels real) loses two rows of 4 patches of the 20 px image; Aria (any pixel) one.
    assert columns.sum(dim=1).tolist() == ([16, 16, 8, 16] if family == "idefics2" else [42, 49, 49, 49])
    padding = ~columns
    assert torch.equal(probabilities[..., :n].permute(0, 3, 1, 2)[padding], torch.zeros_like(probabilities[..., :n].permute(0, 3, 1, 2)[padding]))
    # A padding column of zeros ranks the queries by index (stable sort): with it, the vote would
    # gain n_padding * H * q points for query q, a bias toward late queries.
    every = plain_vote(probabilities, torch.ones_like(columns))
    real = plain_vote(probabilities, columns)
    heads = probabilities.shape[1]
    bias = padding.sum(dim=1, keepdim=True).double() * heads * torch.arange(NUM_QUERY, dtype=torch.float64)
    assert torch.equal(every - real, bias)
    assert bias.any()


def test_the_plain_vote_is_catps_vote_on_the_real_image_columns(family, model):
    """A cross-check of the two implementations on an unpadded batch (catp.scoring is not the reference)."""
    from catp.scoring import vote_scores

    family_inputs = tiny_inputs(family)
    probabilities = connector_probabilities(model, family_inputs)[-1]
    columns = image_columns(model, family_inputs)
    assert columns.all()
    assert torch.equal(plain_vote(probabilities, columns).float(), vote_scores(probabilities[..., : columns.shape[1]]))


def test_renormalising_changes_the_vote_only_where_the_softmax_spans_the_latents(family, model, inputs):
    probabilities = connector_probabilities(model, inputs)[-1]
    columns = image_columns(model, inputs)
    mass = probabilities[..., : columns.shape[1]].sum(dim=-1)
    if family == "aria":
        assert torch.allclose(mass, torch.ones_like(mass), atol=1e-5)
    else:
        assert (mass < 1 - 1e-4).all()  # the latent block takes a share of every row
        assert top_k(plain_vote(probabilities, columns), 4) != top_k(plain_vote(probabilities, columns, True), 4)


def test_aria_per_head_weights_average_to_the_module_weights():
    model = tiny_model("aria")
    inputs = tiny_inputs("aria", **BATCHES["aria"])
    per_head = connector_probabilities(model, inputs)[-1]
    attention = model.model.multi_modal_projector.cross_attn.multihead_attn
    averaged = []
    handle = attention.register_forward_hook(lambda _m, _a, out: averaged.append(out[1]))
    try:
        with torch.no_grad():
            model.get_image_features(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    finally:
        handle.remove()
    assert torch.allclose(per_head.mean(dim=1), averaged[0], atol=1e-6)


def test_aria_larger_images_get_more_queries():
    model = tiny_model("aria")
    inputs = tiny_inputs("aria", images_per_sample=(1, 1), image_sizes={(0, 0): ARIA_LARGE_IMAGE_SIZE, (1, 0): ARIA_LARGE_IMAGE_SIZE})
    rows = connector_rows(model, inputs)
    assert [r.shape[0] for r in rows] == [ARIA_LARGE_QUERY] * 2
    assert connector_probabilities(model, inputs)[-1].shape[2] == ARIA_LARGE_QUERY
    reference = reference_generate(model, inputs, all_rows(model, inputs), **GREEDY)
    assert all(torch.equal(a, b) for a, b in zip(reference.scores, stock_generate(model, inputs, **GREEDY).scores))


def test_the_references_leave_the_model_as_it_was(family, model, inputs):
    before = {name: p.clone() for name, p in model.state_dict().items()}
    settings = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    reference_votes(model, inputs)
    reference_generate(model, inputs, top_k(reference_votes(model, inputs), 2), max_new_tokens=2, do_sample=False)
    assert settings == (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    assert not model.training


PROMPT = "Question: what color is the shape? Short answer:"
#: The text a user gives each family's processor for one image.
PROCESSOR_TEXT = {"idefics2": f"<image> {PROMPT}", "kosmos2": PROMPT, "aria": f"<|img|> {PROMPT}"}


def an_image(height: int = 24, width: int = 32):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((height, width, 3)) * 255).astype("uint8"))


def test_the_processor_lays_out_what_tiny_inputs_builds(family):
    """The hand-built inputs are the stock processor's (same ids, same placeholder positions)."""
    extra = {"max_image_size": 490} if family == "aria" else {}
    out = tiny_processor(family)(text=[PROCESSOR_TEXT[family]], images=[an_image()], return_tensors="pt", **extra)
    built = tiny_inputs(family, images_per_sample=(1,), prompts=(PROMPT,))
    assert out["input_ids"].tolist() == built["input_ids"].tolist()
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in built.items()}


def test_a_saved_tiny_checkpoint_loads_with_its_processor_and_generates_the_same(family, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = save_tiny_checkpoint(family, tmp_path / family)
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    model = tiny_model(family, num_queries=saved_num_queries(family))
    assert type(loaded) is type(model)
    inputs = AutoProcessor.from_pretrained(folder)(text=[PROCESSOR_TEXT[family]], images=[an_image()], return_tensors="pt")
    assert int(placeholder_mask(family, inputs).sum()) == (2 * NUM_QUERY if family == "aria" else saved_num_queries(family))
    assert torch.equal(stock_generate(loaded, inputs, max_new_tokens=3, do_sample=False),
                       stock_generate(model, inputs, max_new_tokens=3, do_sample=False))
