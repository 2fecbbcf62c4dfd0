"""Kosmos-2 (the image-to-text projection) in the Hugging Face integration, against references built by hand.

The references (``tests/family_references.py``) use only stock modules: the vote from the probabilities
an eager copy of the stock projection returns, and the stock model fed only the kept connector rows
through ``image_embeds``, with ``k`` image positions per sample. Stock Kosmos-2 is not batch-invariant
under left padding (its decode positions count the pads, ``SPEC.md`` §10.2), so a pruned batch is
compared with the stock model given the kept rows in the same batch.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import catp
from catp.families import family_of
from catp.families.kosmos2 import KOSMOS2
from family_references import (
    connector_probabilities,
    connector_rows,
    reference_forward,
    reference_generate,
    reference_inputs,
    reference_votes,
    top_k,
)
from tiny_families import NUM_QUERY, PAD, tiny_inputs, tiny_model

from tiny_families import needs_family_transformers

pytestmark = needs_family_transformers

#: The pixel seed whose three images keep different top-4 sets, raw and renormalised (``test_family_references``).
BATCH = dict(images_per_sample=(1, 1, 1), seed=3)
KEEP = 4
#: The tiny LM's tokens hardly move with the image rows, its logits do (``test_the_reference_depends_on_the_kept_rows``):
#: every comparison is of the scores too.
SCORED = dict(max_new_tokens=4, output_scores=True, return_dict_in_generate=True)
GREEDY = dict(SCORED, do_sample=False)
BEAMS = dict(SCORED, do_sample=False, num_beams=3)
SAMPLING = dict(SCORED, do_sample=True, top_k=5)


@pytest.fixture(scope="module")
def model():
    return tiny_model("kosmos2")


@pytest.fixture(scope="module")
def inputs():
    batch = tiny_inputs("kosmos2", **BATCH)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    return batch


def kept_lists(keep_indices: torch.Tensor) -> list[list[int]]:
    """``(B, K)`` ``-1``-padded -> one list of kept queries per sample."""
    return [[i for i in row if i >= 0] for row in keep_indices.tolist()]


def new_tokens(out, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The generated tokens after the caller's prompt ``(B, T)``; the prompt must be the caller's own."""
    length = inputs["input_ids"].shape[1]
    ids = inputs["input_ids"].repeat_interleave(out.sequences.shape[0] // len(inputs["input_ids"]), 0)
    assert torch.equal(out.sequences[:, :length], ids)
    return out.sequences[:, length:]


def assert_same_generation(out, expected, inputs: dict[str, torch.Tensor], rows: slice = slice(None), exact: bool = True) -> None:
    """``out`` (pruned, with the caller's prompt) and ``expected`` (the reference's new tokens only) generated the
    same tokens with the same scores: bit for bit, or to float tolerance where the batches differ (``exact=False``)."""
    assert torch.equal(new_tokens(out, inputs)[rows], expected.sequences)
    assert len(out.scores) == len(expected.scores)
    for ours, theirs in zip(out.scores, expected.scores):
        if exact:
            assert torch.equal(ours[rows], theirs)
        else:
            torch.testing.assert_close(ours[rows], theirs)


def seeded(function, *args, **kwargs):
    """``function(*args, **kwargs)`` under ``torch.manual_seed(0)`` and ``no_grad`` (sampling draws the same)."""
    torch.manual_seed(0)
    with torch.no_grad():
        return function(*args, **kwargs)


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- what the family reads ----------------------------------------------------------------------------------------------


def test_the_model_is_found_and_its_llm_stays_on_sdpa(model, inputs):
    projection = model.image_to_text_projection
    assert family_of(model) is KOSMOS2
    assert projection.x_attn.config is model.text_model.config  # the trap: one setting for both (§10.2)
    seen = []
    handle = model.text_model.model.layers[0].register_forward_pre_hook(
        lambda m, a: seen.append(model.config.text_config._attn_implementation))
    try:
        with catp.pruned(model, keep=KEEP) as session:
            seeded(model.generate, **inputs, **GREEDY)
    finally:
        handle.remove()
    assert seen and set(seen) == {"sdpa"}
    assert session.keep_counts.tolist() == [KEEP] * 3
    assert model.config.text_config._attn_implementation == "sdpa"


def test_recomputed_probabilities_are_the_stock_eager_ones(model, inputs):
    stock = connector_probabilities(model, inputs)[0]  # (B, H, Q, N + Q) from an eager copy
    seen = []
    x_attn = model.image_to_text_projection.x_attn
    handle = x_attn.register_forward_hook(
        lambda m, a, kw, out: seen.append(KOSMOS2.probabilities(m, a, kw, out)), with_kwargs=True)
    try:
        with torch.no_grad():
            model.get_image_features(inputs["pixel_values"])
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], stock.float(), rtol=0, atol=1e-6)
    n = stock.shape[-1] - NUM_QUERY
    assert KOSMOS2.image_probabilities(seen[0]).shape[-1] == n  # CLS and the patches
    assert torch.equal(KOSMOS2.latent_probabilities(seen[0], NUM_QUERY), seen[0][..., n:])


@pytest.mark.parametrize("renormalise", [True, False])
@pytest.mark.parametrize("method", ["catp", "catp-all", "catp-layer"])
def test_kept_set_equals_the_reference_vote(model, inputs, monkeypatch, renormalise, method):
    monkeypatch.setattr(KOSMOS2, "renormalise", renormalise)
    expected = top_k(reference_votes(model, inputs, renormalise=renormalise), KEEP)
    assert len({tuple(k) for k in expected}) == 3  # a row mix-up would show
    with pytest.warns() if method == "catp-layer" else contextlib.nullcontext():
        kept = catp.select_queries(model, inputs["pixel_values"], method=method, keep=KEEP)
    assert kept.tolist() == expected


def test_the_default_vote_renormalises_over_the_image_columns(model, inputs):
    kept = catp.select_queries(model, inputs["pixel_values"], keep=KEEP)
    assert kept.tolist() == top_k(reference_votes(model, inputs, renormalise=True), KEEP)


def test_baselines_read_the_stock_connector(model, inputs):
    """``l2norm``: the norm of ``x_attn``'s output rows (the LLM's input); ``selfattn``: attention received in the
    latent block ``A[..., N:]`` of the same softmax; ``catp-image``: the stock vision tower's last block."""
    rows = torch.stack(connector_rows(model, inputs))  # (B, Q, D)
    expected = top_k(rows.norm(dim=-1), KEEP)
    assert catp.select_queries(model, inputs["pixel_values"], method="l2norm", keep=KEEP).tolist() == expected
    probabilities = connector_probabilities(model, inputs)[0].double()
    received = probabilities[..., -NUM_QUERY:].sum(dim=(1, 2))  # (B, Q): over heads and attending latents
    assert catp.select_queries(model, inputs["pixel_values"], method="selfattn", keep=KEEP).tolist() == top_k(received, KEEP)

    eager = copy.deepcopy(model)
    eager.config.vision_config._attn_implementation = "eager"
    block = eager.vision_model.model.encoder.layers[-1].self_attn
    seen = {}
    block.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("input", kw.get("hidden_states", a[0] if a else None)),
                                    with_kwargs=True)
    block.register_forward_hook(lambda m, a, out: seen.__setitem__("probs", out[1]))
    with torch.no_grad():
        eager.get_image_features(inputs["pixel_values"])
    recomputed = KOSMOS2.vision_probabilities(KOSMOS2.vision_block(model), seen["input"])
    torch.testing.assert_close(recomputed, seen["probs"].float(), rtol=0, atol=1e-6)
    assert recomputed.shape[-1] == probabilities.shape[-1] - NUM_QUERY  # the connector's image columns


# -- the pruned model against the stock model fed the kept rows ---------------------------------------------------------


@pytest.mark.parametrize("generate_kwargs", [GREEDY, BEAMS, SAMPLING], ids=["greedy", "beams", "sampling"])
def test_pruned_generate_equals_the_stock_model_fed_the_kept_rows_in_the_same_batch(model, inputs, generate_kwargs):
    with catp.pruned(model, keep=KEEP) as session:
        out = seeded(model.generate, **inputs, **generate_kwargs)
    kept = kept_lists(session.keep_indices)
    assert_same_generation(out, seeded(reference_generate, model, inputs, kept, **generate_kwargs), inputs)
    built = reference_inputs(model, inputs, kept)
    assert built["image_embeds_position_mask"].sum(dim=1).tolist() == [KEEP] * 3  # k image positions per sample


def test_the_reference_depends_on_the_kept_rows(model, inputs):
    """The comparisons here would pass for any kept set if the scores ignored the image rows: each sample's move."""
    ours = reference_generate(model, inputs, [[0, 1, 2, 3]] * 3, **GREEDY)
    other = reference_generate(model, inputs, [[0, 1, 2, 4]] * 3, **GREEDY)
    for row in range(3):
        assert not torch.equal(ours.scores[0][row], other.scores[0][row])


def test_each_sample_alone_equals_the_stock_model_alone(model, inputs):
    """One by one, a sample keeps the set it keeps in the batch and equals the stock model on it alone."""
    alone = []
    with catp.pruned(model, keep=KEEP) as session:
        seeded(model.generate, **inputs, **GREEDY)
        batch_kept = kept_lists(session.keep_indices)
        for b in range(3):
            real = inputs["attention_mask"][b].bool()
            one = {name: (value[b : b + 1, real] if value.dim() == 2 else value[b : b + 1]) for name, value in inputs.items()}
            alone.append((one, seeded(model.generate, **one, **GREEDY)))
            assert kept_lists(session.keep_indices) == [batch_kept[b]]
    for b, (one, out) in enumerate(alone):
        assert_same_generation(out, seeded(reference_generate, model, one, [batch_kept[b]], **GREEDY), one)


def test_forward_with_labels_equals_the_stock_forward_on_the_kept_rows(model, inputs):
    ids = inputs["input_ids"]
    labels = ids.masked_fill((ids == PAD) | inputs["image_embeds_position_mask"].bool(), -100)
    with catp.pruned(model, keep=KEEP) as session, torch.no_grad():
        out = model(**inputs, labels=labels)
    kept = kept_lists(session.keep_indices)
    assert out.logits.shape[:2] == ids.shape  # the caller's positions
    built = reference_inputs(model, inputs, kept)
    short_labels = torch.stack([labels[b, p] for b, p in enumerate(built["positions"])])  # no pads to add: equal keeps
    stock, positions = reference_forward(model, inputs, kept, labels=short_labels)
    torch.testing.assert_close(out.loss, stock.loss, rtol=0, atol=0)
    for b, where in enumerate(positions):
        text = ~inputs["image_embeds_position_mask"][b, where].bool()  # text positions: the same tokens in both
        torch.testing.assert_close(out.logits[b, where[text]], stock.logits[b, -len(where):][text], rtol=0, atol=0)


def test_keep_all_equals_unpruned_bit_for_bit(model, inputs):
    ids = inputs["input_ids"]
    labels = ids.masked_fill(ids == PAD, -100)
    with torch.no_grad():
        stock = {name: seeded(model.generate, **inputs, **kwargs).sequences for name, kwargs in
                 (("greedy", GREEDY), ("beams", BEAMS), ("sampling", SAMPLING))}
        stock_scores = seeded(model.generate, **inputs, **GREEDY).scores
        stock_forward = model(**inputs, labels=labels)
    with catp.pruned(model, keep=NUM_QUERY) as session:
        for name, kwargs in (("greedy", GREEDY), ("beams", BEAMS), ("sampling", SAMPLING)):
            out = seeded(model.generate, **inputs, **kwargs)
            assert torch.equal(out.sequences, stock[name]), name
            if name == "greedy":
                assert all(torch.equal(a, b) for a, b in zip(out.scores, stock_scores, strict=True))
        with torch.no_grad():
            forward = model(**inputs, labels=labels)
    assert session.keep_counts.tolist() == [NUM_QUERY] * 3
    assert torch.equal(forward.logits, stock_forward.logits)
    assert torch.equal(forward.loss, stock_forward.loss)


def test_a_budget_batch_equals_each_row_as_the_stock_model_sees_it(model, inputs):
    """With a Budget samples keep different counts; the shorter rows get masked fillers at the left, which the
    stock model sees as pads (its decode positions count them). The reference: each row alone, shortened by hand,
    with as many more pads at its left as its fillers."""
    budget = catp.Budget(mass=0.5, min=1, max=NUM_QUERY)
    with catp.pruned(model, keep=budget) as session:
        out = seeded(model.generate, **inputs, **GREEDY)
    kept = kept_lists(session.keep_indices)
    counts = session.keep_counts.tolist()
    assert len(set(counts)) > 1, "the budget must keep different counts for a filler to show"
    assert counts == [len(k) for k in kept]
    for b in range(3):
        one = {name: value[b : b + 1] for name, value in inputs.items()}
        built = reference_inputs(model, one, [kept[b]])
        built.pop("positions")
        extra = max(counts) - counts[b]
        for name, fill in (("input_ids", PAD), ("attention_mask", 0), ("image_embeds_position_mask", 0)):
            built[name] = torch.cat([torch.full((1, extra), fill, dtype=built[name].dtype), built[name]], dim=1)
        expected = seeded(model.generate, **built, **GREEDY)
        expected.sequences = expected.sequences[:, built["input_ids"].shape[1]:]
        assert_same_generation(out, expected, inputs, slice(b, b + 1), exact=False)


def test_every_method_equals_the_stock_model_fed_its_kept_rows(model, inputs):
    for name in catp.METHODS:
        options = {"seed": 0} if name == "random" else {}
        with pytest.warns() if name == "catp-layer" else contextlib.nullcontext():
            with catp.pruned(model, method=name, keep=KEEP, **options) as session:
                out = seeded(model.generate, **inputs, **GREEDY)
            selected = catp.select_queries(model, inputs["pixel_values"], method=name, keep=KEEP, **options)
        assert session.keep_counts.tolist() == [KEEP] * 3, name
        assert_same_generation(out, seeded(reference_generate, model, inputs, kept_lists(session.keep_indices), **GREEDY),
                               inputs)
        assert torch.equal(selected, session.keep_indices), name


def test_catp_layer_says_once_that_it_uses_equal_weights(model, inputs):
    with pytest.warns(UserWarning, match="equal weights") as record:
        kept = catp.select_queries(model, inputs["pixel_values"], method="catp-layer", keep=KEEP)
    assert len([w for w in record if "catp-layer" in str(w.message)]) == 1
    assert kept.tolist() == catp.select_queries(model, inputs["pixel_values"], keep=KEEP).tolist()  # one layer


# -- errors and the model restored --------------------------------------------------------------------------------------


def test_inputs_without_the_position_mask_or_with_a_wrong_count_are_refused(model, inputs):
    no_mask = {k: v for k, v in inputs.items() if k != "image_embeds_position_mask"}
    short = dict(inputs, image_embeds_position_mask=inputs["image_embeds_position_mask"].clone())
    short["image_embeds_position_mask"][1, -1] = 1  # one more marked position in sample 1
    with catp.pruned(model, keep=KEEP):
        with pytest.raises(ValueError, match="image_embeds_position_mask"):
            model.generate(**no_mask, **GREEDY)
        with pytest.raises(ValueError, match="sample 1 has 9"):
            model(**short)
        with pytest.raises(ValueError, match="input_ids and image_embeds_position_mask"):
            model.generate(pixel_values=inputs["pixel_values"], **GREEDY)
    with pytest.raises(ValueError, match=r"pixel_values of shape \(batch, channels, height, width\)"):
        catp.select_queries(model, inputs["pixel_values"][None])
    assert no_hooks(model)


def test_the_model_is_restored_on_exit(model, inputs):
    before = {id(m): m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    stock = seeded(model.generate, **inputs, **GREEDY).scores
    with pytest.raises(RuntimeError, match="boom"):
        with catp.pruned(model, method="catp-image", keep=KEEP):
            seeded(model.generate, **inputs, **GREEDY)
            raise RuntimeError("boom")
    assert "generate" not in model.__dict__ and "generate" not in model.text_model.__dict__
    assert no_hooks(model)
    assert {id(m): m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == before
    assert all(torch.equal(a, b) for a, b in zip(seeded(model.generate, **inputs, **GREEDY).scores, stock, strict=True))


def test_model_loading_reads_the_family():
    from transformers import Kosmos2ForConditionalGeneration

    from catp.models import MODEL_TYPES, model_class

    assert MODEL_TYPES["kosmos-2"] == "Kosmos2ForConditionalGeneration"
    assert model_class("kosmos-2") is Kosmos2ForConditionalGeneration
