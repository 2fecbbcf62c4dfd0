"""Aria (``AriaProjector``) in the Hugging Face integration, against references built by hand.

The references (``tests/family_references.py``) use only stock modules: the per-head probabilities of
the stock ``nn.MultiheadAttention`` (``average_attn_weights=False``), the vote computed by hand over the
real patches, and the stock model fed the kept projector rows through ``mm_encoder_outputs`` with ``k``
placeholders per crop. The batch has left padding, a sample with two images and a padded image.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import catp
from catp.families import family_of
from family_references import (
    connector_probabilities,
    connector_rows,
    image_columns,
    pixel_inputs,
    reference_forward,
    reference_generate,
    reference_votes,
    top_k,
)
from tiny_families import ARIA_IMAGE, ARIA_LARGE_IMAGE_SIZE, ARIA_LARGE_QUERY, IDS, NUM_QUERY, PAD, tiny_inputs, tiny_model

from tiny_families import needs_family_transformers

pytestmark = needs_family_transformers

IMAGES = (1, 2, 1)
#: The reference tests' Aria batch: left padding, two images in sample 1, sample 0's image padded.
BATCH = dict(images_per_sample=IMAGES, padded=((0, 0),), seed=4)
K = 3
GREEDY = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model("aria")


@pytest.fixture(scope="module")
def inputs():
    return tiny_inputs("aria", **BATCH)


def crop_lists(keep_indices: torch.Tensor, images: tuple[int, ...], queries: int = NUM_QUERY) -> list[list[int]]:
    """Per crop (sample by sample), the kept query indices of a session's ``(B, K)`` flat indices."""
    crops: list[list[int]] = []
    for row, count in zip(keep_indices.tolist(), images):
        kept = [i for i in row if i >= 0]
        crops += [[i % queries for i in kept if i // queries == c] for c in range(count)]
    return crops


def pruned_generate(model, inputs, method="catp", keep=K, **kwargs):
    with torch.no_grad(), catp.pruned(model, method, keep=keep) as session:
        out = model.generate(**inputs, **kwargs)
    cut = inputs["input_ids"].shape[1]
    if isinstance(out, torch.Tensor):
        return out[:, cut:], session
    out.sequences = out.sequences[:, cut:]
    return out, session


def assert_same_generation(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores) and all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))


def sample(inputs: dict[str, torch.Tensor], images: tuple[int, ...], b: int) -> dict[str, torch.Tensor]:
    """Sample ``b`` of a batch alone: its prompt without the left padding, and its crops' pixel rows."""
    real = inputs["attention_mask"][b].bool()
    first = sum(images[:b])
    return {"input_ids": inputs["input_ids"][b, real][None], "attention_mask": inputs["attention_mask"][b, real][None],
            "pixel_values": inputs["pixel_values"][first:first + images[b]],
            "pixel_mask": inputs["pixel_mask"][first:first + images[b]]}


# -- the family ------------------------------------------------------------------------------


def test_the_family_is_found_from_the_model_and_the_config(model):
    family = family_of(model)
    assert family.name == "aria"
    assert catp.families.family_of_type(model.config.model_type) is family
    assert family.num_queries(model.config) == ARIA_LARGE_QUERY
    assert family.queries_for(model, torch.zeros(1, 3, 490, 490)) == NUM_QUERY
    with pytest.raises(ValueError, match="490 px, 980 px"):
        family.queries_for(model, torch.zeros(1, 3, 224, 224))


def test_the_features_are_the_last_blocks_output_before_post_layernorm(model, inputs):
    """What catp-image reads: the projector's input is the output of the vision block catp hooks."""
    seen = {}
    block = family_of(model).vision_block(model)
    layer = model.model.vision_tower.encoder.layers[-1]
    assert block is layer.self_attn
    handles = [layer.register_forward_hook(lambda _m, _a, out: seen.setdefault("block", out)),
               model.model.multi_modal_projector.register_forward_pre_hook(lambda _m, args: seen.setdefault("projector", args[0]))]
    try:
        with torch.no_grad():
            model.model.get_image_features(**pixel_inputs(inputs))
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(seen["block"], seen["projector"])


# -- the kept set ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["catp", "catp-all", "catp-layer"])
def test_the_kept_set_is_the_reference_vote(model, inputs, method):
    """One cross layer: catp, catp-all and catp-layer are the same vote; padded patches cast none."""
    expected = top_k(reference_votes(model, inputs), K)
    assert len({tuple(k) for k in expected}) > 1  # the images keep different sets: a row mix-up fails
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        selected = catp.select_queries(model, inputs["pixel_values"], method, keep=K, pixel_mask=inputs["pixel_mask"])
        _, session = pruned_generate(model, inputs, method, max_new_tokens=1, do_sample=False)
    assert selected.tolist() == expected
    assert crop_lists(session.keep_indices, IMAGES) == expected


def test_padded_patches_do_not_vote(model, inputs):
    """catp's scores are the hand-built vote over the real patches; counting the padded image's padding
    columns would change its scores."""
    columns = image_columns(model, inputs)
    assert not columns[0].all() and columns[1:].all()
    probabilities = connector_probabilities(model, inputs)[-1]
    everything = probabilities[0].double().argsort(dim=1, stable=True).argsort(dim=1).sum(dim=(0, 2))
    expected = reference_votes(model, inputs)  # (crops, Q)
    assert not torch.equal(everything, expected[0])
    _, session = pruned_generate(model, inputs, max_new_tokens=1, do_sample=False)
    flat = [row[: NUM_QUERY * n] for row, n in zip(session.scores.double(), IMAGES)]
    assert torch.equal(torch.cat(flat).reshape(-1, NUM_QUERY), expected)


def test_l2norm_reads_the_cross_attention_output(model, inputs):
    outputs = []
    handle = model.model.multi_modal_projector.cross_attn.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    try:
        with torch.no_grad():
            model.model.get_image_features(**pixel_inputs(inputs))
    finally:
        handle.remove()
    expected = top_k(outputs[0].norm(dim=-1), K)
    assert catp.select_queries(model, inputs["pixel_values"], "l2norm", keep=K, pixel_mask=inputs["pixel_mask"]).tolist() == expected


def test_catp_image_weights_the_vote_by_the_stock_vision_attention(model, inputs):
    """The weights are the attention each patch receives in the stock eager last vision block."""
    eager = copy.deepcopy(model)
    eager.model.vision_tower.set_attn_implementation("eager")
    with torch.no_grad():
        vision = eager.model.get_image_features(**pixel_inputs(inputs), output_attentions=True).attentions[-1]
    received = vision.double().sum(dim=(1, 2))
    weights = received / received.sum(dim=-1, keepdim=True)
    probabilities = connector_probabilities(model, inputs)[-1].double()
    ranks = probabilities.argsort(dim=2, stable=True).argsort(dim=2).double()  # (I, H, Q, N)
    votes = (ranks * (weights * image_columns(model, inputs))[:, None, None, :]).sum(dim=(1, 3))
    kept = catp.select_queries(model, inputs["pixel_values"], "catp-image", keep=K, pixel_mask=inputs["pixel_mask"])
    assert kept.tolist() == top_k(votes, K)


def test_selfattn_is_refused_with_the_reason(model, inputs):
    with pytest.raises(ValueError, match="never attend to each other"):
        catp.pruned(model, "selfattn", keep=K).__enter__()
    with pytest.raises(ValueError, match="never attend to each other"):
        catp.select_queries(model, inputs["pixel_values"], "selfattn", keep=K)


def test_catp_layer_warns_that_it_uses_equal_weights(model, inputs):
    with pytest.warns(UserWarning, match="BLIP-2's Q-Former"):
        catp.select_queries(model, inputs["pixel_values"], "catp-layer", keep=K)


# -- the pruned language model ------------------------------------------------------------


def test_pruned_generate_is_the_stock_model_fed_the_kept_rows(model, inputs):
    out, session = pruned_generate(model, inputs, **GREEDY)
    kept = crop_lists(session.keep_indices, IMAGES)
    assert kept == top_k(reference_votes(model, inputs), K)
    assert_same_generation(out, reference_generate(model, inputs, kept, **GREEDY))


@pytest.mark.parametrize("settings", [dict(num_beams=2, do_sample=False), dict(do_sample=True, top_k=5)],
                         ids=["beam", "sampling"])
def test_beam_and_sampling_generate_are_the_reference(model, inputs, settings):
    kwargs = dict(max_new_tokens=3, output_scores=True, return_dict_in_generate=True, **settings)
    torch.manual_seed(0)
    out, session = pruned_generate(model, inputs, **kwargs)
    torch.manual_seed(0)
    expected = reference_generate(model, inputs, crop_lists(session.keep_indices, IMAGES), **kwargs)
    assert_same_generation(out, expected)


def test_forward_with_labels_is_the_reference(model, inputs):
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == IDS[ARIA_IMAGE], -100)
    with torch.no_grad(), catp.pruned(model, "catp", keep=K) as session:
        out = model(**inputs, labels=labels)
    kept = crop_lists(session.keep_indices, IMAGES)
    short_labels = [labels[b, p] for b, p in enumerate(reference_forward(model, inputs, kept)[1])]
    longest = max(len(x) for x in short_labels)
    padded = torch.stack([torch.cat([torch.full((longest - len(x),), -100), x]) for x in short_labels])
    expected, positions = reference_forward(model, inputs, kept, labels=padded)
    assert torch.allclose(out.loss, expected.loss, atol=1e-6)
    for b, row in enumerate(session.keep_indices.tolist()):
        # catp's logits sit at the positions of the placeholders of the queries it kept (the reference keeps the
        # first k of each crop's: they are alike), and are 0 at the dropped ones.
        slots = (inputs["input_ids"][b] == IDS[ARIA_IMAGE]).nonzero().flatten()
        dropped = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.bool)
        dropped[slots] = True
        dropped[slots[[i for i in row if i >= 0]]] = False
        assert len(positions[b]) == int((~dropped).sum())
        real = inputs["attention_mask"][b, ~dropped].bool()  # a padding position's logits mean nothing
        short = expected.logits[b, -len(positions[b]):]
        assert torch.allclose(out.logits[b, ~dropped][real], short[real], atol=1e-5)
        assert (out.logits[b, dropped] == 0).all()


def test_a_batch_is_its_samples_one_by_one(model, inputs):
    batched, session = pruned_generate(model, inputs, **GREEDY)
    for b in range(len(IMAGES)):
        alone, alone_session = pruned_generate(model, sample(inputs, IMAGES, b), **GREEDY)
        kept = session.keep_indices[b]
        assert alone_session.keep_indices[0].tolist() == kept[kept >= 0].tolist()
        assert torch.equal(alone.sequences[0], batched.sequences[b])
        assert all(torch.allclose(a[0], s[b], atol=1e-5) for a, s in zip(alone.scores, batched.scores))


def test_keep_all_is_the_unpruned_model_bit_for_bit(model, inputs):
    with torch.no_grad():
        stock = model.generate(**inputs, **GREEDY)
        stock_logits = model(**inputs).logits
    out, _ = pruned_generate(model, inputs, keep=NUM_QUERY, **GREEDY)
    assert torch.equal(out.sequences, stock.sequences[:, inputs["input_ids"].shape[1]:])
    assert all(torch.equal(a, b) for a, b in zip(out.scores, stock.scores))
    with torch.no_grad(), catp.pruned(model, "catp", keep=NUM_QUERY):
        logits = model(**inputs).logits
    assert torch.equal(logits, stock_logits)


# -- every method, keeps, resolutions ------------------------------------------------------


@pytest.mark.parametrize("method", catp.METHODS)
def test_every_method_prunes_each_crop_or_says_why_not(model, inputs, method):
    if method == "selfattn":
        with pytest.raises(ValueError, match="selfattn"):
            pruned_generate(model, inputs, method, max_new_tokens=2, do_sample=False)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, session = pruned_generate(model, inputs, method, max_new_tokens=2, do_sample=False)
    assert session.keep_counts.tolist() == [K * n for n in IMAGES]
    kept = crop_lists(session.keep_indices, IMAGES)
    assert all(len(k) == K for k in kept)
    assert torch.equal(out, reference_generate(model, inputs, kept, max_new_tokens=2, do_sample=False))


def test_a_budget_keeps_per_crop_counts_and_matches_the_reference(model, inputs):
    budget = catp.Budget(mass=0.5, min=1)
    with torch.no_grad(), catp.pruned(model, "catp", keep=budget) as session:
        out = model.generate(**inputs, **GREEDY)
    kept = crop_lists(session.keep_indices, IMAGES)
    assert len({len(k) for k in kept}) > 1  # the crops keep different counts
    out.sequences = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert_same_generation(out, reference_generate(model, inputs, kept, **GREEDY))


def test_a_budget_with_beams_is_each_sample_alone(model, inputs):
    """Crops keep different counts; beam search still splits the kept rows per sample."""
    budget = catp.Budget(mass=0.5, min=1)
    beams = dict(num_beams=2, do_sample=False, max_new_tokens=3)
    with torch.no_grad(), catp.pruned(model, "catp", keep=budget) as session:
        batched = model.generate(**inputs, **beams)[:, inputs["input_ids"].shape[1]:]
    assert len(set(session.keep_counts.tolist())) > 1
    for b in range(len(IMAGES)):
        alone = sample(inputs, IMAGES, b)
        with torch.no_grad(), catp.pruned(model, "catp", keep=budget):
            out = model.generate(**alone, **beams)[:, alone["input_ids"].shape[1]:]
        assert torch.equal(out[0], batched[b])


def test_a_fraction_counts_over_each_resolutions_queries(model):
    """Q is 8 at 490 px and 16 at 980 px: keep=0.5 keeps 4 and 8; the large queries are the reference's."""
    large = tiny_inputs("aria", images_per_sample=(1, 1), seed=1,
                        image_sizes={(0, 0): ARIA_LARGE_IMAGE_SIZE, (1, 0): ARIA_LARGE_IMAGE_SIZE})
    small = tiny_inputs("aria", images_per_sample=(1, 1), seed=1)
    with torch.no_grad(), catp.pruned(model, "catp", keep=0.5) as session:
        model.generate(**small, max_new_tokens=1)
        assert session.keep_counts.tolist() == [NUM_QUERY // 2] * 2
        out = model.generate(**large, **GREEDY)
        assert session.keep_counts.tolist() == [ARIA_LARGE_QUERY // 2] * 2
    kept = crop_lists(session.keep_indices, (1, 1), ARIA_LARGE_QUERY)
    assert kept == top_k(reference_votes(model, large), ARIA_LARGE_QUERY // 2)
    out.sequences = out.sequences[:, large["input_ids"].shape[1]:]
    assert_same_generation(out, reference_generate(model, large, kept, **GREEDY))
    with pytest.raises(ValueError):
        with catp.pruned(model, "catp", keep=12):
            model.generate(**small, max_new_tokens=1)  # 12 of the 8 queries of a 490 px image


def test_scope_sample_counts_over_a_samples_crops(model, inputs):
    even = tiny_inputs("aria", images_per_sample=(2, 2), seed=4)
    with torch.no_grad(), catp.pruned(model, "catp", keep=4, scope="sample") as session:
        model.generate(**even, max_new_tokens=1)
    votes = reference_votes(model, even).reshape(2, 2 * NUM_QUERY)
    assert session.keep_indices.tolist() == top_k(votes, 4)


# -- inputs and exit ------------------------------------------------------------------------


def test_placeholders_that_do_not_match_the_crops_are_a_clear_error(model, inputs):
    wrong = dict(inputs, pixel_values=inputs["pixel_values"][:3], pixel_mask=inputs["pixel_mask"][:3])
    with catp.pruned(model, "catp", keep=K), pytest.raises(ValueError, match="4 crops .* pixel_values has 3"):
        model.generate(**wrong, max_new_tokens=1)
    ids = inputs["input_ids"].clone()
    ids[0, ids[0].tolist().index(IDS[ARIA_IMAGE])] = PAD
    with catp.pruned(model, "catp", keep=K), pytest.raises(ValueError, match="8 <|img|> placeholders per crop"):
        model.generate(**dict(inputs, input_ids=ids), max_new_tokens=1)


def test_the_model_is_restored_on_exit(model, inputs):
    before = {name: p.clone() for name, p in model.state_dict().items()}
    attention = model.model.multi_modal_projector.cross_attn.multihead_attn
    with torch.no_grad():
        stock = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="inside"), catp.pruned(model, "catp-image", keep=K):
        model.generate(**inputs, max_new_tokens=1)
        raise RuntimeError("inside")
    assert hooks == {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    assert getattr(model, "_catp_session", None) is None
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    weights = []
    handle = attention.register_forward_hook(lambda _m, _a, out: weights.append(out[1]))
    try:
        with torch.no_grad():
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), stock)
    finally:
        handle.remove()
    assert weights[0].dim() == 3  # head-averaged again
    assert model.config.text_config._attn_implementation == "sdpa"


def test_no_pixel_mask_means_every_patch_votes(model, inputs):
    plain = {k: v for k, v in inputs.items() if k != "pixel_mask"}
    expected = top_k(reference_votes(model, plain), K)
    out, session = pruned_generate(model, plain, **GREEDY)
    assert crop_lists(session.keep_indices, IMAGES) == expected
    assert_same_generation(out, reference_generate(model, plain, expected, **GREEDY))
    assert len(connector_rows(model, plain)) == sum(IMAGES)
