"""Properties of the pure scoring functions (no model)."""

from __future__ import annotations

import pytest
import torch

from catp import scoring
from tiny_models import top_k, top_order
from catp.methods import CATPLayer, get_method

B, H, Q, N = 2, 3, 6, 10


def probs(seed: int = 0, shape=(B, H, Q, N)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Softmax over image tokens, like a real cross-attention map.
    return torch.randn(shape, generator=g).softmax(dim=-1)


def test_rank_votes_is_argsort_of_argsort():
    attn = probs()
    expected = attn.argsort(dim=2).argsort(dim=2).float()
    assert torch.equal(scoring.rank_votes(attn), expected)


def test_unanimous_favourite_gets_all_points():
    attn = probs()
    attn[:, :, 4, :] = 2.0  # query 4 beats every other query for every (head, image token)
    scores = scoring.catp_scores([attn])
    assert torch.all(scores[:, 4] == H * N * (Q - 1))
    # Every voter hands out 0 + 1 + ... + (Q-1) points in total.
    assert torch.allclose(scores.sum(dim=1), torch.full((B,), H * N * Q * (Q - 1) / 2))


@pytest.mark.parametrize("name", ["catp", "catp-all", "catp-layer", "catp-image", "selfattn", "l2norm"])
def test_permuting_queries_permutes_scores(name):
    layers = [probs(seed) for seed in range(3)]
    self_attn = [torch.randn(B, H, Q + 2, Q + 2).softmax(-1) for _ in range(2)]
    vision = torch.randn(B, H, N, N).softmax(-1)
    query_output = torch.randn(B, Q, 5)
    perm = torch.randperm(Q, generator=torch.Generator().manual_seed(1))
    full_perm = torch.cat([perm, torch.arange(Q, Q + 2)])

    def score(cross, self_maps, out):
        weights = scoring.image_token_weights(vision)
        return {
            "catp": lambda: scoring.catp_scores(cross),
            "catp-all": lambda: scoring.catp_all_scores(cross),
            "catp-layer": lambda: scoring.catp_layer_scores(cross, [0.5, 0.2, 0.3]),
            "catp-image": lambda: scoring.catp_image_scores(cross, weights),
            "selfattn": lambda: scoring.selfattn_scores(self_maps, Q),
            "l2norm": lambda: scoring.l2norm_scores(out),
        }[name]()

    base = score(layers, self_attn, query_output)
    permuted = score(
        [a[:, :, perm] for a in layers],
        [a[:, :, full_perm][:, :, :, full_perm] for a in self_attn],
        query_output[:, perm],
    )
    assert torch.allclose(permuted, base[:, perm])


def test_catp_image_with_uniform_weights_ranks_like_catp():
    layers = [probs(0), probs(1)]
    uniform = torch.full((B, N), 0.3)
    plain = scoring.catp_scores(layers)
    weighted = scoring.catp_image_scores(layers, uniform)
    assert torch.allclose(weighted, 0.3 * plain)
    assert torch.equal(top_k(weighted, 3), top_k(plain, 3))


def test_image_weights_change_the_kept_set():
    # Two image tokens, two heads... one head suffices: token 0 prefers query 0, tokens 1-2 prefer query 1.
    attn = torch.zeros(1, 1, 2, 3)
    attn[0, 0, :, 0] = torch.tensor([0.9, 0.1])
    attn[0, 0, :, 1] = torch.tensor([0.2, 0.8])
    attn[0, 0, :, 2] = torch.tensor([0.3, 0.7])
    assert top_k(scoring.catp_scores([attn]), 1).item() == 1  # majority: query 1
    important_token_0 = torch.tensor([[10.0, 1.0, 1.0]])
    assert top_k(scoring.catp_image_scores([attn], important_token_0), 1).item() == 0


def test_weighting_probabilities_instead_of_ranks_is_a_no_op():
    # The authors' bug: scaling a column of probabilities cannot change the vote.
    attn = probs()
    w = torch.rand(B, N) + 0.1
    assert torch.equal(scoring.catp_scores([attn * w[:, None, None, :]]), scoring.catp_scores([attn]))
    assert not torch.allclose(scoring.catp_image_scores([attn], w), scoring.catp_scores([attn]))


def test_catp_all_votes_on_the_summed_map():
    layers = [probs(0), probs(1), probs(2)]
    summed = layers[0] + layers[1] + layers[2]
    assert torch.equal(scoring.catp_all_scores(layers), scoring.vote_scores(summed))
    assert not torch.equal(scoring.catp_all_scores(layers), sum(scoring.vote_scores(a) for a in layers))


def test_catp_layer_one_hot_weights_select_that_layer():
    layers = [probs(0), probs(1), probs(2)]
    for i in range(3):
        weights = [0.0, 0.0, 0.0]
        weights[i] = 1.0
        assert torch.equal(scoring.catp_layer_scores(layers, weights), scoring.vote_scores(layers[i]))


def test_image_token_weights_sum_received_attention_and_normalise():
    vision = torch.randn(B, H, N, N).softmax(-1)
    w = scoring.image_token_weights(vision)
    raw = vision.sum(dim=(1, 2))
    assert torch.allclose(w, raw / raw.sum(dim=-1, keepdim=True))
    assert torch.allclose(w.sum(dim=-1), torch.ones(B))


def test_selfattn_uses_only_the_query_block():
    attn = torch.zeros(1, 1, Q + 3, Q + 3)
    attn[0, 0, :, Q + 1] = 5.0  # attention to an instruction token must not count
    attn[0, 0, :Q, 2] = 1.0
    scores = scoring.selfattn_scores([attn], Q)
    assert scores.shape == (1, Q)
    assert scores[0, 2] == Q and scores.sum() == Q


def test_default_layer_weights_pick_nearest_row_in_log_scale():
    half = scoring.default_layer_weights(6, 0.5)
    row = torch.tensor(scoring.PAPER_LAYER_ACCURACY[0.5])
    assert torch.allclose(half, row / row.sum())
    # 3/32 is nearer 1/8 than 1/4 in log scale; 0.2 is nearer 1/4.
    eighth = torch.tensor(scoring.PAPER_LAYER_ACCURACY[1 / 8])
    assert torch.allclose(scoring.default_layer_weights(6, 3 / 32), eighth / eighth.sum())
    quarter = torch.tensor(scoring.PAPER_LAYER_ACCURACY[1 / 4])
    assert torch.allclose(scoring.default_layer_weights(6, 0.2), quarter / quarter.sum())
    assert scoring.default_layer_weights(2, 0.5) is None


def test_catp_layer_warns_and_uses_equal_weights_off_paper_shape():
    with pytest.warns(UserWarning, match="equal weights"):
        w = CATPLayer().weights_for(2, 0.25)
    assert torch.equal(w, torch.tensor([0.5, 0.5]))


def test_topk_indices_ascending_and_stable_ties():
    scores = torch.tensor([[1.0, 5.0, 5.0, 0.0, 5.0], [3.0, 2.0, 1.0, 0.0, 4.0]])
    assert top_k(scores, 2).tolist() == [[1, 2], [0, 4]]
    assert top_k(scores, 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert top_k(scores, 2).dtype == torch.long
    # The order a scorer "picks" in: highest first, ties to the lower index.
    assert top_order(scores, 3).tolist() == [[1, 2, 4], [4, 0, 1]]


def test_random_scores_are_seeded_per_row():
    a = scoring.random_scores(3, Q, seed=7)
    assert torch.equal(a[0], a[1])  # one seed: every row the same draw, whatever the batch
    b = scoring.random_scores(2, Q, seed=[7, 8])
    assert torch.equal(b[0], a[0]) and not torch.equal(b[1], a[0])
    with pytest.raises(ValueError, match="seeds"):
        scoring.random_scores(2, Q, seed=[1, 2, 3])


def test_first_keeps_the_first_tokens():
    assert top_k(scoring.first_scores(2, Q), 3).tolist() == [[0, 1, 2]] * 2


@pytest.mark.parametrize(
    "weights, match",
    [([1.0, 2.0], "has 2 entries"), ([1.0, -1.0, 1.0], "non-negative"), ([0.0, 0.0, 0.0], "all be zero")],
)
def test_bad_layer_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        scoring.catp_layer_scores([probs(0), probs(1), probs(2)], weights)


def test_no_cross_attention_captured_is_a_clear_error():
    with pytest.raises(ValueError, match="eager"):
        scoring.catp_scores([])


def test_get_method_errors():
    with pytest.raises(ValueError, match="unknown method 'catpp'"):
        get_method("catpp")
    with pytest.raises(TypeError, match="layer_weight"):
        get_method("catp-layer", layer_weight=[1.0])
    with pytest.raises(TypeError, match="method must be"):
        get_method(3)
