"""catp.Budget: the rules on hand-made scores, and per-sample counts in batched calls on tiny models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE_TOKEN, NUM_QUERY, hand_built_generate, hand_built_inputs, tiny_inputs, tiny_model, decoder_only

import catp
from catp.budget import Budget, fence_counts, mass_counts
from catp.selection import keep_mask, mask_indices

# ---- the rules ----------------------------------------------------------------------


def test_mass_keeps_the_smallest_set_reaching_the_share_above_the_mean():
    scores = torch.tensor([[4.0, 3.0, 1.0, 0.0]])  # mean 2: excess 2, 1, 0, 0 (total 3)
    assert mass_counts(scores, 0.5).item() == 1  # 2 >= 1.5
    assert mass_counts(scores, 0.8).item() == 2  # 2 < 2.4 <= 3
    assert mass_counts(scores, 1.0).item() == 2  # the tokens at or below the mean carry no mass
    assert mass_counts(torch.tensor([[10.0, 0.0, 0.0, 0.0]]), 1.0).item() == 1


def test_mass_without_anything_above_the_mean_keeps_min():
    flat = torch.full((2, 8), 3.0)
    assert mass_counts(flat, 0.8).tolist() == [0, 0]
    assert Budget(mass=0.8).counts(flat).tolist() == [1, 1]
    assert Budget(mass=0.8, min=3).counts(flat).tolist() == [3, 3]


def test_fence_keeps_the_outliers_above_q3_plus_fence_iqr():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0]])  # Q1 1.75, Q3 5.25, IQR 3.5
    assert fence_counts(scores, 1.5).item() == 1  # above 10.5: only 100
    assert fence_counts(scores, 0.0).item() == 2  # above Q3: 6 and 100
    assert Budget(fence=1.5).counts(torch.arange(8.0)[None]).item() == 1  # no outlier: min


@pytest.mark.parametrize("budget", [Budget(mass=0.7), Budget(fence=0.5)])
def test_rules_ignore_shift_and_scale(budget):
    scores = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)).exp()
    assert torch.equal(budget.counts(scores), budget.counts(3.0 * scores + 7.0))


def test_counts_are_clamped_to_min_max_and_the_tokens():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 0.0, 0.0, 0.0, 0.0]])
    assert Budget(mass=1.0).counts(scores).item() == 4
    assert Budget(mass=1.0, max=2).counts(scores).item() == 2
    assert Budget(mass=0.1, min=3).counts(scores).item() == 3
    assert Budget(mass=1.0, max=100).counts(scores).item() == 4
    with pytest.raises(ValueError, match="min=9 is more than the 8 tokens"):
        Budget(mass=0.5, min=9).counts(scores)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "exactly one rule"),
        ({"mass": 0.5, "fence": 1.0}, ValueError, "exactly one rule"),
        ({"mass": 0.0}, ValueError, r"mass=0.0 is out of range"),
        ({"mass": 1.5}, ValueError, r"mass=1.5 is out of range"),
        ({"fence": -1.0}, ValueError, "fence=-1.0 is out of range"),
        ({"fence": float("inf")}, ValueError, "out of range"),
        ({"mass": "0.8"}, TypeError, "mass must be a number"),
        ({"mass": 0.8, "min": 0}, ValueError, "min=0 is out of range"),
        ({"mass": 0.8, "min": 2.0}, TypeError, "min must be an int"),
        ({"mass": 0.8, "min": 4, "max": 2}, ValueError, "max=2 is below min=4"),
    ],
)
def test_bad_budgets(kwargs, error, match):
    with pytest.raises(error, match=match):
        Budget(**kwargs)


def test_parse_and_str_round_trip():
    for text in ["mass:0.8", "fence:1.5", "fence:0:min=2:max=16", "mass:0.95:max=8"]:
        assert str(Budget.parse(text)) == text
    assert Budget.parse("mass:0.8:min=2") == Budget(mass=0.8, min=2)
    for bad in ["mass", "mass:", "mass:x", "size:3", "mass:0.8:min", "mass:0.8:min=2:min=3", "fence:1:top=2"]:
        with pytest.raises(ValueError, match="cannot read budget"):
            Budget.parse(bad)


def test_keep_mask_and_padded_indices():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5], [0.3, 0.2, 0.1, 0.0]])
    mask = keep_mask(scores, torch.tensor([3, 1]))
    assert mask.tolist() == [[False, True, True, True], [True, False, False, False]]
    assert mask_indices(mask).tolist() == [[1, 2, 3], [0, -1, -1]]
    assert keep_mask(scores, torch.tensor([1, 0]))[0].tolist() == [False, True, False, False]
    assert keep_mask(torch.tensor([[0.5, 0.5, 0.5]]), 2).tolist() == [[True, True, False]]  # ties: lower index


# ---- on tiny models -----------------------------------------------------------------

GREEDY = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
BUDGET = Budget(mass=0.9)


def method_for(family: str) -> str:
    """A method whose counts differ between the samples of ``tiny_inputs`` on ``family``.

    Not ``l2norm``: the tiny models' Q-Former outputs leave a LayerNorm with unit weights, so
    every query has the same norm and its kept set is decided by float noise (which moves
    with the thread count). ``catp``'s votes are integer rank sums.
    """
    return "catp" if family == "blip2-t5" else "catp-all"


def single(inputs: dict, i: int) -> dict:
    """Sample ``i`` alone, without its padding."""
    real = inputs["attention_mask"][i].bool()
    return {k: v[i : i + 1, real] if k in ("input_ids", "attention_mask") else v[i : i + 1] for k, v in inputs.items()}


@pytest.mark.parametrize("layout", ["processor", "pad-first"])
def test_batched_budget_equals_one_by_one(model, family, layout):
    inputs = tiny_inputs(family, prompt_lengths=(6, 2, 4), layout=layout)
    with catp.pruned(model, method=method_for(family), keep=BUDGET) as session:
        out = model.generate(**inputs, **GREEDY)
        counts, kept, scores = session.keep_counts.clone(), session.keep_indices.clone(), session.scores.clone()
        assert counts.shape == (3,) and len(set(counts.tolist())) > 1  # fillers are in play
        assert kept.shape == (3, int(counts.max())) and torch.equal((kept >= 0).sum(dim=1), counts)
        assert torch.equal(kept >= 0, torch.arange(kept.shape[1]) < counts[:, None])  # -1 only at the end
        assert torch.equal(counts, BUDGET.counts(scores))
        prompt = inputs["input_ids"].shape[1] if decoder_only(model) else 1  # T5: after the decoder start token
        for i in range(3):
            one = single(inputs, i)
            alone = model.generate(**one, **GREEDY)
            assert session.keep_counts.item() == counts[i] and torch.equal(session.keep_indices[0], kept[i, : counts[i]])
            new = alone.sequences[0, one["input_ids"].shape[1] if decoder_only(model) else 1 :]
            if decoder_only(model) or layout == "pad-first":  # T5 moves with padding between image and text, even unpruned
                assert torch.equal(out.sequences[i, prompt : prompt + new.shape[0]], new), f"sample {i}"
                for batched, step in zip(out.logits, alone.logits):
                    assert torch.allclose(batched[i], step[0], atol=1e-4), f"sample {i}"
            reference = hand_built_generate(model, inputs, i, kept[i, : counts[i]].tolist(), **GREEDY)
            assert torch.equal(out.sequences[i, prompt : prompt + len(reference.logits)], reference.sequences[0, -len(reference.logits):])


def test_fillers_are_masked_where_padding_goes(model, family):
    """Decoder-only: at the left of the row; T5: after the text."""
    inputs = tiny_inputs(family, prompt_lengths=(4, 4, 4))  # no padding of the caller's: every 0 is a filler
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("mask", kwargs["attention_mask"].clone())

    encoder = model.language_model.get_encoder() if not decoder_only(model) else model.language_model
    handle = encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with catp.pruned(model, method=method_for(family), keep=BUDGET) as session:
            model.generate(**inputs, max_new_tokens=2)
    finally:
        handle.remove()
    mask, counts = seen["mask"], session.keep_counts
    for row, count in zip(mask.tolist(), counts.tolist()):
        fillers = int(counts.max()) - count
        expected = [0] * fillers + [1] * (len(row) - fillers) if decoder_only(model) else [1] * (len(row) - fillers) + [0] * fillers
        assert row == expected


def test_forward_with_a_budget(model, family):
    """Logits at the caller's positions and the loss of the shortened sequence, sample by sample."""
    layout = "processor" if decoder_only(model) else "pad-first"
    inputs = tiny_inputs(family, prompt_lengths=(6, 2, 4), layout=layout)
    if decoder_only(model):
        labels = inputs["input_ids"].masked_fill((inputs["input_ids"] == IMAGE_TOKEN) | (inputs["attention_mask"] == 0), -100)
    else:
        labels = torch.randint(3, 90, (3, 4), generator=torch.Generator().manual_seed(0))
    with catp.pruned(model, method=method_for(family), keep=BUDGET) as session, torch.no_grad():
        out = model(**inputs, labels=labels)
        kept, counts = session.keep_indices.clone(), session.keep_counts.clone()
        assert torch.isfinite(out.loss)
        for i in range(3):
            built = hand_built_inputs(model, inputs, i, kept[i, : counts[i]].tolist())
            if decoder_only(model):
                ref = model.language_model(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"])
                assert out.logits.shape[:2] == inputs["input_ids"].shape
                dropped = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool).index_fill(0, built["positions"], False)
                assert torch.all(out.logits[i, dropped] == 0)
                if family == "blip2-opt":  # OPT positions follow the mask; LLaMA's forward counts the fillers (stock does too)
                    assert torch.allclose(out.logits[i, built["positions"]], ref.logits[0], atol=1e-4)
                alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}, labels=labels[i : i + 1])
                short_labels = labels[i, built["positions"]]
                expected = torch.nn.functional.cross_entropy(ref.logits[0, :-1], short_labels[1:], ignore_index=-100)
                assert torch.allclose(alone.loss, expected, atol=1e-5)
            else:
                ref = model.language_model(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"],
                                           labels=labels[i : i + 1])
                assert torch.allclose(out.logits[i], ref.logits[0], atol=1e-4)


def test_beam_search_with_a_budget():
    model = tiny_model("blip2-opt")
    inputs = tiny_inputs("blip2-opt", prompt_lengths=(6, 2, 4))
    with catp.pruned(model, method=method_for("blip2-opt"), keep=BUDGET) as session:
        out = model.generate(**inputs, num_beams=3, num_return_sequences=2, max_new_tokens=4)
    assert len(set(session.keep_counts.tolist())) > 1 and out.shape[0] == 6
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].repeat_interleave(2, dim=0))


def test_select_queries_with_a_budget():
    model = tiny_model("blip2-opt")
    inputs = tiny_inputs("blip2-opt", prompt_lengths=(6, 2, 4))
    kept = catp.select_queries(model, inputs["pixel_values"], method=method_for("blip2-opt"), keep=BUDGET)
    with catp.pruned(model, method=method_for("blip2-opt"), keep=BUDGET) as session:
        model.generate(**inputs, max_new_tokens=1)
    assert torch.equal(kept, session.keep_indices) and (kept == -1).any()


@pytest.mark.parametrize("method", ["first", "random"])
def test_methods_without_informative_scores_refuse_a_budget(method):
    with pytest.raises(ValueError, match=f"method '{method}' cannot carry a Budget"):
        with catp.pruned(tiny_model("blip2-opt"), method=method, keep=Budget(mass=0.8)):
            pass


@pytest.mark.parametrize("method", ["divprune", "dart", "catp-diverse"])
def test_selectors_refuse_a_budget(method):
    with pytest.raises(ValueError, match=f"method '{method}' is a selector: .* no scores for a Budget"):
        with catp.pruned(tiny_model("blip2-opt"), method=method, keep=Budget(mass=0.8)):
            pass


def test_budget_min_above_the_tokens():
    with pytest.raises(ValueError, match=f"min={NUM_QUERY + 1} is more than the {NUM_QUERY} tokens"):
        with catp.pruned(tiny_model("blip2-opt"), keep=Budget(mass=0.8, min=NUM_QUERY + 1)):
            pass
    video = tiny_model("instructblipvideo-llama")
    with pytest.raises(ValueError, match=f"more than the {NUM_QUERY} tokens"):
        with catp.pruned(video, keep=Budget(mass=0.8, min=NUM_QUERY + 1), scope="frame"):
            pass
    with catp.pruned(video, keep=Budget(mass=0.8, min=NUM_QUERY + 1)) as session:  # over T*Q: fine
        session.model.generate(**tiny_inputs("instructblipvideo-llama"), max_new_tokens=1)
    assert torch.all(session.keep_counts >= NUM_QUERY + 1)


def test_budget_counts_table():
    from catp.evaluation.budgets import budget_counts_table

    model = tiny_model("blip2-opt")
    pixel_values = tiny_inputs("blip2-opt", prompt_lengths=(1,) * 5)["pixel_values"]
    rows = budget_counts_table(model, pixel_values, ["catp"], [Budget(fence=1.5), Budget(mass=1.0, min=2)], batch_size=2)
    assert [(r["method"], r["budget"], r["images"]) for r in rows] == [("catp", "fence:1.5", 5), ("catp", "mass:1:min=2", 5)]
    counts = catp.select_queries(model, pixel_values, keep=Budget(fence=1.5))
    assert rows[0]["at_min"] == ((counts >= 0).sum(dim=1) == 1).float().mean().item()
    assert all(r["kept_min"] >= 1 for r in rows) and rows[1]["kept_min"] >= 2
