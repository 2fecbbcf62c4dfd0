"""lab/family_vote.py: the two votes it compares and the LLM input it builds."""

from __future__ import annotations

import math

import torch

from lab.family_vote import build_tokenizer, encode, top_k, votes


def test_raw_and_renormalised_votes_differ_where_the_latents_take_a_share():
    # One head, two queries, two image columns and two latent columns. Query 0 gives the image 0.1
    # (evenly), query 1 gives it 0.9 (0.6 and 0.3).
    probabilities = torch.tensor([[[[0.05, 0.05, 0.5, 0.4], [0.6, 0.3, 0.05, 0.05]]]])
    v = votes(probabilities, n_image=2)
    assert v["raw"].tolist() == [[0.0, 2.0]]  # query 1 is larger in both columns
    assert v["renormalised"].tolist() == [[1.0, 1.0]]  # 0.5/0.5 against 0.67/0.33: one column each
    assert torch.allclose(v["mass"], torch.tensor([[0.1, 0.9]], dtype=torch.float64))
    assert math.isclose(float(v["entropy"][0, 0]), math.log(2))


def test_top_k_is_ascending_with_ties_to_the_lower_index():
    assert top_k(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), 2).tolist() == [[1, 2]]
    assert top_k(torch.tensor([[5.0, 5.0, 5.0]]), 2).tolist() == [[0, 1]]


def test_encode_writes_k_placeholders_and_labels_only_the_answer():
    tokenizer = build_tokenizer()
    enc = encode(tokenizer, ["what color is the shape?", "is there a circle?"], ["red", "yes"], keep=3, q=64)
    ids = enc["input_ids"]
    assert enc["image_embeds_position_mask"].sum(dim=1).tolist() == [3, 3]
    assert ids[0, 2:5].tolist() == [tokenizer.unk_token_id + 1 + i for i in range(3)]  # Kosmos-2's distinct ids
    assert (enc["labels"] != -100).sum(dim=1).tolist() == [1, 1]
    at = enc["answer_at"]
    assert tokenizer.convert_ids_to_tokens([int(ids[0, at[0]]), int(ids[1, at[1]])]) == ["red", "yes"]
    assert enc["attention_mask"][1, at[1] + 1:].sum() == 0  # right padding after the shorter row
