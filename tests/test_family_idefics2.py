"""Idefics2 (perceiver resampler) in the Hugging Face integration, against references built by hand.

The references use only stock modules: probabilities from the stock eager resampler, the vote computed
here, and the stock model fed the kept connector rows through ``mm_encoder_outputs``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Idefics2Config, Idefics2ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

import catp
from catp.families import IDEFICS2

from tiny_families import needs_family_transformers

pytestmark = needs_family_transformers

Q = 8
IMG = 99
FAKE = 98
PAD = 1
BOS = 2
PATCHES = 16  # 32 px / patch 8, squared


def tiny_idefics2(seed: int = 0) -> Idefics2ForConditionalGeneration:
    """A small random Idefics2 whose latents do not tie (stock init: ones)."""
    torch.manual_seed(seed)
    config = Idefics2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                           patch_size=8),
        perceiver_config=dict(hidden_size=32, resampler_n_latents=Q, resampler_depth=2, resampler_n_heads=4,
                              resampler_head_dim=8, num_key_value_heads=2),
        text_config=dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=BOS,
                         max_position_embeddings=256),
        image_token_id=IMG,
    )
    model = Idefics2ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.connector.perceiver_resampler.latents.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_idefics2()


def make_inputs(images_per_sample=(1, 1), text_lengths=(5, 3), seed: int = 0, pad_patches: bool = False) -> dict:
    """A left-padded batch: [PAD...][BOS text][FAKE IMG x Q FAKE] per image, then two text tokens.

    Samples with fewer images than the batch's most get all-zero padding images (as the processor pads).
    ``pad_patches``: the right half of sample 0's first image is padding (``pixel_attention_mask`` 0).
    """
    g = torch.Generator().manual_seed(seed)
    most = max(images_per_sample)
    rows = []
    for n, length in zip(images_per_sample, text_lengths):
        text = [BOS] + torch.randint(3, 90, (length,), generator=g).tolist()
        rows.append(text + ([FAKE] + [IMG] * Q + [FAKE]) * n + torch.randint(3, 90, (2,), generator=g).tolist())
    longest = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (longest - len(r)) + r for r in rows])
    pixels = torch.randn(len(rows), most, 3, 32, 32, generator=g)
    pixel_mask = torch.ones(len(rows), most, 32, 32, dtype=torch.long)
    for b, n in enumerate(images_per_sample):
        pixels[b, n:] = 0.0
        pixel_mask[b, n:] = 0
    if pad_patches:
        pixels[0, 0, :, :, 16:] = 0.0
        pixel_mask[0, 0, :, 16:] = 0
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "pixel_values": pixels, "pixel_attention_mask": pixel_mask}


def stock_probabilities(model, inputs) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The stock eager resampler's last-layer probabilities ``(rows, H, Q, N + Q)``, its patch mask ``(rows, N)`` and
    the stock connector rows per sample, from a deep copy (the caller's model stays as it is)."""
    eager = copy.deepcopy(model)
    eager.model.connector.perceiver_resampler.set_attn_implementation("eager")
    seen = {}
    eager.model.connector.perceiver_resampler.layers[-1].self_attn.register_forward_hook(
        lambda m, a, out: seen.__setitem__("probs", out[1]))
    eager.model.connector.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("mask", kw["attention_mask"]), with_kwargs=True)
    with torch.no_grad():
        rows = eager.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output
    return seen["probs"].float(), seen["mask"].bool(), rows


def hand_vote(probs: torch.Tensor, mask: torch.Tensor, k: int, renormalise: bool = True) -> torch.Tensor:
    """The CATP vote written out: per (head, real image column), rank the queries (stable), sum; top k ascending."""
    n = probs.shape[-1] - probs.shape[-2]
    image = probs[..., :n]
    if renormalise:
        image = image / image.sum(dim=-1, keepdim=True)
    ranks = image.argsort(dim=2, stable=True).argsort(dim=2).float()  # rank of each query in its column
    points = (ranks * mask[:, None, None, :].float()).sum(dim=(1, 3))  # (rows, Q)
    top = points.argsort(dim=1, descending=True, stable=True)[:, :k]
    return top.sort(dim=1).values


def stock_generate_on_rows(model, inputs, kept_per_sample: list[torch.Tensor], **generate_kwargs) -> list[torch.Tensor]:
    """Per sample, the stock model fed only its kept connector rows, with one placeholder per kept row (and its
    padding dropped). Returns the new tokens."""
    _, _, rows = stock_probabilities(model, inputs)
    new = []
    for b, kept in enumerate(kept_per_sample):
        ids = inputs["input_ids"][b]
        ids = ids[inputs["attention_mask"][b].bool()]
        rank = (ids == IMG).cumsum(0) - 1
        short = ids[(ids != IMG) | torch.isin(rank, kept)][None]
        encoded = BaseModelOutputWithPooling(pooler_output=[rows[b][kept]])
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(input_ids=short, attention_mask=torch.ones_like(short), mm_encoder_outputs={"image": encoded},
                                 **generate_kwargs)
        new.append(out[0, short.shape[1]:])
    return new


def kept_rows(session) -> list[torch.Tensor]:
    return [row[row >= 0] for row in session.keep_indices]


GREEDY = dict(max_new_tokens=4, do_sample=False)


def test_latents_do_not_tie_and_images_keep_different_sets(model):
    latents = model.model.connector.perceiver_resampler.latents
    assert torch.cdist(latents, latents).add(torch.eye(Q) * 1e3).min() > 0.1
    kept = catp.select_queries(model, make_inputs((1, 1, 1, 1), (3, 3, 3, 3))["pixel_values"], keep=3)
    assert len({tuple(r) for r in kept.tolist()}) > 1  # a row mix-up would show


@pytest.mark.parametrize("renormalise", [True, False])
@pytest.mark.parametrize("pad_patches", [False, True])
def test_kept_set_equals_hand_vote(model, monkeypatch, renormalise, pad_patches):
    monkeypatch.setattr(IDEFICS2, "renormalise", renormalise)
    inputs = make_inputs((1, 1, 1), (3, 4, 5), seed=3, pad_patches=pad_patches)
    probs, mask, _ = stock_probabilities(model, inputs)
    assert mask.all() != pad_patches
    kept = catp.select_queries(model, inputs["pixel_values"], keep=3, pixel_attention_mask=inputs["pixel_attention_mask"])
    assert torch.equal(kept, hand_vote(probs, mask, 3, renormalise))


def test_padded_patches_do_not_vote(model):
    inputs = make_inputs((1,), (3,), seed=5, pad_patches=True)
    probs, mask, _ = stock_probabilities(model, inputs)
    assert (probs[..., :PATCHES][:, :, :, ~mask[0]] == 0).all()  # padded columns: 0 for every query
    kept = catp.select_queries(model, inputs["pixel_values"], keep=3, pixel_attention_mask=inputs["pixel_attention_mask"])
    assert torch.equal(kept, hand_vote(probs, mask, 3))


def test_pruned_generate_equals_stock_model_fed_kept_rows(model):
    inputs = make_inputs((1, 1), (5, 3), seed=1)
    with catp.pruned(model, keep=3) as session, torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])  # the caller's prompt, as stock
    expected = stock_generate_on_rows(model, inputs, kept_rows(session), **GREEDY)
    for b, new in enumerate(expected):
        assert torch.equal(out[b, inputs["input_ids"].shape[1]:], new)


def test_batch_equals_samples_one_by_one(model):
    inputs = make_inputs((1, 1, 1), (6, 2, 4), seed=2)
    with catp.pruned(model, keep=3) as session, torch.no_grad():
        batched = model.generate(**inputs, **GREEDY)
        kept = session.keep_indices.clone()
        for b in range(3):
            one = {name: value[b : b + 1] for name, value in inputs.items()}
            pad = int((one["attention_mask"][0] == 0).sum())
            one = {name: value[:, pad:] if name in ("input_ids", "attention_mask") else value for name, value in one.items()}
            alone = model.generate(**one, **GREEDY)
            assert torch.equal(session.keep_indices[0], kept[b])
            assert torch.equal(alone[0, one["input_ids"].shape[1]:], batched[b, inputs["input_ids"].shape[1]:])


def test_keep_all_equals_unpruned_bit_for_bit(model):
    inputs = make_inputs((2, 1), (5, 3), seed=4)
    eager = copy.deepcopy(model)  # pruning runs the resampler eager: the bit-for-bit reference does too
    eager.model.connector.perceiver_resampler.set_attn_implementation("eager")
    with torch.no_grad():
        stock = model.generate(**inputs, **GREEDY)
        stock_logits = eager(**inputs).logits
    with catp.pruned(model, keep=Q) as session, torch.no_grad():
        assert torch.equal(model.generate(**inputs, **GREEDY), stock)
        assert torch.equal(model(**inputs).logits, stock_logits)
    assert session.keep_counts.tolist() == [2 * Q, Q]


def test_forward_with_labels(model):
    inputs = make_inputs((1, 1), (5, 3), seed=6)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == PAD, -100)
    with catp.pruned(model, keep=3) as session, torch.no_grad():
        out = model(**inputs, labels=labels)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    # The reference: the stock forward on the shortened sequence (kept placeholders, same left padding).
    _, _, rows = stock_probabilities(model, inputs)
    ids = inputs["input_ids"]
    rank = (ids == IMG).cumsum(1) - 1
    keep = (ids != IMG) | torch.stack([torch.isin(rank[b], kept) for b, kept in enumerate(kept_rows(session))])
    short = torch.stack([ids[b][keep[b]] for b in range(2)])
    with torch.no_grad():
        stock = model(input_ids=short, attention_mask=(short != PAD).long(), labels=short.masked_fill(short == PAD, -100),
                      mm_encoder_outputs={"image": BaseModelOutputWithPooling(
                          pooler_output=[rows[b][kept] for b, kept in enumerate(kept_rows(session))])})
    torch.testing.assert_close(out.loss, stock.loss)
    torch.testing.assert_close(out.logits[keep], stock.logits.flatten(0, 1))


def test_crops_and_several_images_prune_each_group(model):
    inputs = make_inputs((2, 1), (4, 6), seed=7)
    with catp.pruned(model, keep=3) as session, torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
    assert session.scope == "group" and session.keep_counts.tolist() == [6, 3]
    first, second = session.keep_indices[0].tolist()[:3], session.keep_indices[0].tolist()[3:]
    assert all(i < Q for i in first) and all(Q <= i < 2 * Q for i in second)  # 3 of each image's Q
    expected = stock_generate_on_rows(model, inputs, kept_rows(session), **GREEDY)
    for b, new in enumerate(expected):
        assert torch.equal(out[b, inputs["input_ids"].shape[1]:], new)
    with pytest.raises(ValueError, match="same number of crops in every sample"):
        with catp.pruned(model, keep=4, scope="sample"), torch.no_grad():
            model.generate(**inputs, **GREEDY)
    even = make_inputs((2, 2), (4, 6), seed=7)
    with catp.pruned(model, keep=5, scope="video") as session, torch.no_grad():  # the older spelling of "sample"
        model.generate(**even, **GREEDY)
    assert session.keep_counts.tolist() == [5, 5]


def test_every_method_runs(model):
    inputs = make_inputs((1, 1), (5, 3), seed=8)
    for name in catp.METHODS:
        with catp.pruned(model, method=name, keep=3) as session, torch.no_grad():
            out = model.generate(**inputs, **GREEDY)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 4), name
        assert session.keep_counts.tolist() == [3, 3], name


def test_catp_layer_says_once_that_it_uses_equal_weights(model):
    inputs = make_inputs((1,), (3,), seed=9)
    with pytest.warns(UserWarning, match="BLIP-2's Q-Former.*equal weights"):
        catp.select_queries(model, inputs["pixel_values"], method="catp-layer", keep=3)


def test_budget(model):
    inputs = make_inputs((1, 1), (5, 3), seed=10)
    with catp.pruned(model, method="catp", keep=catp.Budget(mass=0.8, min=1, max=Q)) as session, torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
    counts = session.keep_counts.tolist()
    assert all(1 <= c <= Q for c in counts)
    expected = stock_generate_on_rows(model, inputs, kept_rows(session), **GREEDY)
    for b, new in enumerate(expected):
        assert torch.equal(out[b, inputs["input_ids"].shape[1]:], new)


@pytest.mark.parametrize("generate_kwargs", [dict(num_beams=3, max_new_tokens=4, do_sample=False),
                                             dict(do_sample=True, top_k=5, max_new_tokens=4)])
def test_beam_and_sampling(model, generate_kwargs):
    inputs = make_inputs((1,), (4,), seed=11)
    with catp.pruned(model, keep=3) as session, torch.no_grad():
        torch.manual_seed(0)
        out = model.generate(**inputs, **generate_kwargs)
    expected = stock_generate_on_rows(model, inputs, kept_rows(session), **generate_kwargs)
    assert torch.equal(out[0, inputs["input_ids"].shape[1]:], expected[0])


def test_model_restored_on_exit(model):
    inputs = make_inputs((1,), (3,), seed=12)
    resampler = model.model.connector.perceiver_resampler
    before = resampler.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with catp.pruned(model, keep=3), torch.no_grad():
            model.generate(**inputs, **GREEDY)
            assert resampler.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert resampler.config._attn_implementation == before
    assert model.config.text_config._attn_implementation == "sdpa"
    assert "generate" not in model.__dict__
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_model_loading_reads_the_family():
    from catp.models import MODEL_TYPES, model_class

    assert MODEL_TYPES["idefics2"] == "Idefics2ForConditionalGeneration"
    assert model_class("idefics2") is Idefics2ForConditionalGeneration
